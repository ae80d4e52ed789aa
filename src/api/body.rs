//! Reading JSON request bodies field by field, so every 400 names the field at fault and
//! unknown fields are refused instead of silently ignored.

use serde_json::{Map, Value};

use super::ApiError;
use crate::schema::FieldRule;

/// One CPU-heavy API job at a time per node: a flood of large requests queues here instead
/// of taking the cores the runtime (Raft heartbeats, gossip, the health endpoint) needs.
static HEAVY: std::sync::LazyLock<tokio::sync::Semaphore> =
    std::sync::LazyLock::new(|| tokio::sync::Semaphore::new(1));

/// Runs CPU-heavy request work (parsing a large body, a certificate chain) on the blocking
/// pool, one job at a time.
pub async fn off_runtime<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let failed = || {
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "request processing failed",
        )
    };
    let _permit = HEAVY.acquire().await.map_err(|_| failed())?;
    tokio::task::spawn_blocking(job).await.map_err(|_| failed())
}

/// Bodies up to this size are parsed in place (microseconds); larger ones on the blocking pool.
const INLINE_PARSE_MAX: usize = 16 * 1024;

pub struct Body {
    fields: Map<String, Value>,
    seen: Vec<&'static str>,
}

impl Body {
    /// [`Body::parse`], on the blocking pool when the body is large: the API shares its
    /// runtime with Raft heartbeats and gossip, which a 2 MiB parse must not hold up.
    pub async fn read(bytes: axum::body::Bytes) -> Result<Self, ApiError> {
        if bytes.len() <= INLINE_PARSE_MAX {
            return Self::parse(&bytes);
        }
        off_runtime(move || Self::parse(&bytes)).await?
    }

    /// Parses `bytes` as a JSON object. An empty body is an empty object.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(Self {
                fields: Map::new(),
                seen: Vec::new(),
            });
        }
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(fields)) => Ok(Self {
                fields,
                seen: Vec::new(),
            }),
            Ok(_) => Err(ApiError::bad_request("request body must be a JSON object")),
            Err(e) => Err(ApiError::bad_request(format!(
                "request body is not valid JSON: {e}"
            ))),
        }
    }

    /// Moves the field out (no copy of a large value).
    fn take(&mut self, name: &'static str) -> Option<Value> {
        self.seen.push(name);
        self.fields.remove(name)
    }

    fn type_error(name: &str, expected: &str, got: &Value) -> ApiError {
        let kind = match got {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        };
        ApiError::bad_request(format!("field `{name}`: expected {expected}, got {kind}"))
    }

    pub fn opt_str(&mut self, name: &'static str) -> Result<Option<String>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(Self::type_error(name, "a string", &other)),
        }
    }

    pub fn req_str(&mut self, name: &'static str) -> Result<String, ApiError> {
        self.opt_str(name)?
            .ok_or_else(|| ApiError::bad_request(format!("field `{name}` is required")))
    }

    /// `None` = absent, `Some(None)` = explicit null (clear), `Some(Some(s))` = set.
    pub fn nullable_str(&mut self, name: &'static str) -> Result<Option<Option<String>>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(Value::String(s)) => Ok(Some(Some(s))),
            Some(other) => Err(Self::type_error(name, "a string or null", &other)),
        }
    }

    pub fn opt_bool(&mut self, name: &'static str) -> Result<Option<bool>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(Self::type_error(name, "true or false", &other)),
        }
    }

    pub fn opt_str_list(&mut self, name: &'static str) -> Result<Option<Vec<String>>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(Self::type_error(name, "an array of strings", &other)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(other) => Err(Self::type_error(name, "an array of strings", &other)),
        }
    }

    /// A required field checked by its rule (the same one the config file and Raft use).
    pub fn req<T: FieldRule>(&mut self, name: &'static str) -> Result<T, ApiError> {
        let raw = self.req_str(name)?;
        T::parse(&raw).map_err(|e| ApiError::field(name, e))
    }

    /// An optional field checked by its rule.
    pub fn opt<T: FieldRule>(&mut self, name: &'static str) -> Result<Option<T>, ApiError> {
        self.opt_str(name)?
            .map(|raw| T::parse(&raw).map_err(|e| ApiError::field(name, e)))
            .transpose()
    }

    /// A nullable field checked by its rule (`Some(None)` = explicit null).
    pub fn nullable<T: FieldRule>(
        &mut self,
        name: &'static str,
    ) -> Result<Option<Option<T>>, ApiError> {
        Ok(match self.nullable_str(name)? {
            None => None,
            Some(None) => Some(None),
            Some(Some(raw)) => Some(Some(T::parse(&raw).map_err(|e| ApiError::field(name, e))?)),
        })
    }

    /// A nullable JSON value (an object) read through its type's own rule, as a Raft entry
    /// reads it (`Some(None)` = explicit null). The error names the field.
    pub fn nullable_json<T: serde::de::DeserializeOwned>(
        &mut self,
        name: &'static str,
    ) -> Result<Option<Option<T>>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(v @ Value::Object(_)) => serde_json::from_value(v)
                .map(|t| Some(Some(t)))
                .map_err(|e| ApiError::field(name, e)),
            Some(other) => Err(Self::type_error(name, "an object or null", &other)),
        }
    }

    /// An optional list of at most `max` items that follow a rule; the error names the item's
    /// index. The count is checked first, so an oversized list costs no per-item work.
    pub fn opt_list<T: FieldRule>(
        &mut self,
        name: &'static str,
        max: usize,
    ) -> Result<Option<Vec<T>>, ApiError> {
        if let Some(Value::Array(items)) = self.fields.get(name) {
            if items.len() > max {
                return Err(ApiError::field(
                    name,
                    format!("{} items given, at most {max} are allowed", items.len()),
                ));
            }
        }
        let Some(items) = self.opt_str_list(name)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, raw)| T::parse(raw).map_err(|e| ApiError::field(&format!("{name}[{i}]"), e)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Ignores `name` if present (e.g. read-only fields echoed back by clients).
    pub fn ignore(&mut self, name: &'static str) {
        self.seen.push(name);
        self.fields.remove(name);
    }

    /// Refuses fields the endpoint does not know.
    pub fn finish(self) -> Result<(), ApiError> {
        // Fields read or ignored were removed: what is left is unknown.
        let mut unknown: Vec<&String> = self.fields.keys().collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(k) => Err(ApiError::bad_request(format!(
                "field `{k}` is not known here (allowed: {})",
                self.seen.join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fields() {
        let mut b = Body::parse(br#"{"a": 1, "b": "x", "z": true}"#).unwrap();
        assert!(b.req_str("a").unwrap_err().message.contains("`a`"));
        assert_eq!(b.req_str("b").unwrap(), "x");
        assert!(b
            .req_str("c")
            .unwrap_err()
            .message
            .contains("`c` is required"));
        assert!(b.finish().unwrap_err().message.contains("`z`"));
        assert!(Body::parse(b"{").is_err());
        assert!(Body::parse(b"[]").is_err());
        assert!(Body::parse(b"").unwrap().finish().is_ok());
    }
}
