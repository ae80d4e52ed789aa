//! Paging and filtering of the list answers (`?limit=&cursor=&q=&tag=&healthy=`): the query's
//! rules and the walk over a key-ordered map, shared by every list endpoint
//! (docs/api.md, "Lists").
//!
//! A cursor is the key of the last item of the previous page (the state's maps are ordered,
//! so the next page starts right after it, whatever was created or deleted meanwhile), sent
//! hex-encoded with the list it belongs to so clients treat it as opaque and a cursor of
//! another list is refused.

use std::ops::Bound;

use super::views::Page;
use super::ApiError;
use crate::schema::{BackendId, DomainName, FieldRule, Tag};

/// Items per page when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest `limit`: a page of 1,000 backends is about 0.5 MB of JSON.
pub const MAX_LIMIT: usize = 1000;
/// Longest `q` (a prefix of a domain name, the longest key).
pub const MAX_Q_LEN: usize = 253;

/// The paged lists, each with the query parameters it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    Domains,
    Backends,
    Certs,
    /// `/api/v1/domains/{domain}/backends`: the backends of the domain's active tag.
    DomainBackends,
}

impl List {
    fn params(self) -> &'static [&'static str] {
        match self {
            List::Domains | List::Backends => &["limit", "cursor", "q", "tag", "healthy"],
            List::Certs => &["limit", "cursor", "q"],
            List::DomainBackends => &["limit", "cursor", "q", "healthy"],
        }
    }

    /// Written into the cursor: a cursor of one list is refused by another.
    fn cursor_kind(self) -> &'static str {
        match self {
            List::Domains => "d1",
            List::Backends => "b1",
            List::Certs => "c1",
            List::DomainBackends => "p1",
        }
    }

    /// Keys of domain lists are lower-case names; backend ids keep their case.
    fn domain_keys(self) -> bool {
        matches!(self, List::Domains | List::Certs)
    }
}

/// A list request's parameters, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub limit: usize,
    /// The page starts after this key.
    pub after: Option<String>,
    /// Keys starting with this (lower-cased for domain lists).
    pub q: Option<String>,
    pub tag: Option<Tag>,
    pub healthy: Option<bool>,
}

fn param_error(name: &str, problem: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("query parameter `{name}`: {problem}"))
}

impl ListQuery {
    /// Reads the query's `name=value` pairs (decoded). Unknown and repeated names are refused,
    /// like unknown body fields: a typo (`?limt=10`) must not silently mean "no limit".
    pub fn parse(list: List, pairs: &[(String, String)]) -> Result<Self, ApiError> {
        let mut q = ListQuery {
            limit: DEFAULT_LIMIT,
            after: None,
            q: None,
            tag: None,
            healthy: None,
        };
        let mut seen: Vec<&str> = Vec::new();
        for (name, value) in pairs {
            let Some(known) = list.params().iter().find(|p| **p == name.as_str()) else {
                return Err(param_error(
                    name,
                    format!("unknown; this list takes {}", list.params().join(", ")),
                ));
            };
            if seen.contains(known) {
                return Err(param_error(name, "given more than once"));
            }
            seen.push(known);
            match *known {
                "limit" => {
                    q.limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            param_error(
                                "limit",
                                format!("{value:?} is not a whole number from 1 to {MAX_LIMIT}"),
                            )
                        })?;
                }
                "cursor" => {
                    q.after = Some(decode_cursor(list, value).ok_or_else(|| {
                        param_error(
                            "cursor",
                            "is not a cursor of this list (pass `next_cursor` of the previous page unchanged)",
                        )
                    })?);
                }
                "q" => {
                    if value.len() > MAX_Q_LEN {
                        return Err(param_error(
                            "q",
                            format!("{} bytes, at most {MAX_Q_LEN}", value.len()),
                        ));
                    }
                    if !value.is_empty() {
                        q.q = Some(if list.domain_keys() {
                            value.to_ascii_lowercase()
                        } else {
                            value.clone()
                        });
                    }
                }
                "tag" => q.tag = Some(Tag::parse(value).map_err(|e| param_error("tag", e))?),
                "healthy" => {
                    q.healthy = Some(match value.as_str() {
                        "true" => true,
                        "false" => false,
                        other => {
                            return Err(param_error(
                                "healthy",
                                format!("{other:?} is not true or false"),
                            ))
                        }
                    })
                }
                _ => unreachable!("every name of List::params is handled"),
            }
        }
        Ok(q)
    }

    /// True when items are filtered by more than their key.
    fn filters_values(&self) -> bool {
        self.tag.is_some() || self.healthy.is_some()
    }
}

/// The cursor pointing after `key` in `list`.
pub fn encode_cursor(list: List, key: &str) -> String {
    let raw = format!("{}:{key}", list.cursor_kind());
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The key a cursor points after, if it is a valid cursor of `list`.
fn decode_cursor(list: List, cursor: &str) -> Option<String> {
    if !cursor.len().is_multiple_of(2) || cursor.len() > 2 * (MAX_Q_LEN + 3) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(cursor.get(i..i + 2)?, 16).ok())
        .collect();
    let raw = String::from_utf8(bytes?).ok()?;
    let key = raw.strip_prefix(list.cursor_kind())?.strip_prefix(':')?;
    // A key that no item of this list can have is not one this API handed out.
    let valid = if list.domain_keys() {
        DomainName::parse(key).is_ok_and(|d| d.as_str() == key)
    } else {
        BackendId::parse(key).is_ok_and(|b| b.as_str() == key)
    };
    valid.then(|| key.to_string())
}

/// One page of `map` (key order): the items after the cursor whose key starts with `q` and
/// that `keep` accepts, at most `limit` of them, viewed by `view`; `total` counts every item
/// that matches, on all pages.
///
/// Cost: without filters O(log n + limit) (`total` is the map's size); with `q` alone, the
/// keys with that prefix; with `tag` or `healthy` (`filtered`), one pass over the candidates
/// (`keep` is called once per item of the prefix range, or of the whole map).
pub fn page<V: Clone, T>(
    map: &imbl::OrdMap<String, V>,
    list: List,
    query: &ListQuery,
    filtered: bool,
    mut keep: impl FnMut(&V) -> bool,
    view: impl Fn(&V) -> T,
) -> Page<T> {
    let filtered = filtered || query.filters_values();
    let mut items = Vec::new();
    let mut last_key: Option<&String> = None;
    let mut more = false;
    let after = query.after.as_ref();
    if !filtered && query.q.is_none() {
        let from = match after {
            Some(a) => Bound::Excluded(a.clone()),
            None => Bound::Unbounded,
        };
        for (k, v) in map.range((from, Bound::Unbounded)) {
            if items.len() == query.limit {
                more = true;
                break;
            }
            items.push(view(v));
            last_key = Some(k);
        }
        return Page::new(
            items,
            map.len(),
            more.then(|| encode_cursor(list, last_key_or(last_key))),
        );
    }
    let prefix = query.q.clone().unwrap_or_default();
    let mut total = 0;
    for (k, v) in map.range((Bound::Included(prefix.clone()), Bound::Unbounded)) {
        if !k.starts_with(&prefix) {
            break;
        }
        if !keep(v) {
            continue;
        }
        total += 1;
        if after.is_some_and(|a| k <= a) {
            continue;
        }
        if items.len() < query.limit {
            items.push(view(v));
            last_key = Some(k);
        } else {
            more = true;
        }
    }
    Page::new(
        items,
        total,
        more.then(|| encode_cursor(list, last_key_or(last_key))),
    )
}

/// `more` is only set after a full page, so there is a last key; "" keeps this total.
fn last_key_or(k: Option<&String>) -> &str {
    k.map_or("", String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &str) -> Vec<(String, String)> {
        q.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    #[test]
    fn query_rules() {
        let ok =
            ListQuery::parse(List::Domains, &pairs("limit=5&q=Shop&tag=b&healthy=false")).unwrap();
        assert_eq!(
            ok,
            ListQuery {
                limit: 5,
                after: None,
                q: Some("shop".into()),
                tag: Some("b".into()),
                healthy: Some(false),
            }
        );
        let defaults = ListQuery::parse(List::Backends, &pairs("q=")).unwrap();
        assert_eq!((defaults.limit, defaults.q), (DEFAULT_LIMIT, None));
        assert_eq!(
            ListQuery::parse(List::Backends, &pairs("q=Web")).unwrap().q,
            Some("Web".into()),
            "backend ids keep their case"
        );
        let cursor = encode_cursor(List::Domains, "a.test");
        assert_eq!(
            ListQuery::parse(List::Domains, &pairs(&format!("cursor={cursor}")))
                .unwrap()
                .after,
            Some("a.test".into())
        );
        let long_q = format!("q={}", "a".repeat(MAX_Q_LEN + 1));
        let other_list = format!("cursor={}", encode_cursor(List::Backends, "web-1"));
        let not_a_name = format!("cursor={}", encode_cursor(List::Domains, "A B"));
        // (query, list, the parameter the error must name)
        let bad: &[(&str, List, &str)] = &[
            ("limit=0", List::Domains, "limit"),
            ("limit=1001", List::Domains, "limit"),
            ("limit=ten", List::Domains, "limit"),
            ("limit=-1", List::Domains, "limit"),
            ("cursor=zz", List::Domains, "cursor"),
            ("cursor=abc", List::Domains, "cursor"),
            (&other_list, List::Domains, "cursor"),
            (&not_a_name, List::Domains, "cursor"),
            (&long_q, List::Domains, "q"),
            ("tag=a b", List::Domains, "tag"),
            ("healthy=no", List::Backends, "healthy"),
            ("tag=a", List::Certs, "tag"),
            ("tag=a", List::DomainBackends, "tag"),
            ("limt=10", List::Domains, "limt"),
            ("limit=1&limit=2", List::Domains, "limit"),
        ];
        for (query, list, field) in bad {
            let e = ListQuery::parse(*list, &pairs(query)).expect_err(query);
            assert_eq!(e.status, 400, "{query}");
            assert!(
                e.message
                    .starts_with(&format!("query parameter `{field}`: ")),
                "{query}: {}",
                e.message
            );
        }
    }

    fn map(keys: &[&str]) -> imbl::OrdMap<String, u32> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| (k.to_string(), i as u32))
            .collect()
    }

    /// Follows `next_cursor` through every page; returns the pages' items and totals.
    fn walk(
        m: &imbl::OrdMap<String, u32>,
        query: &str,
        keep: impl Fn(&u32) -> bool,
    ) -> (Vec<Vec<u32>>, Vec<usize>) {
        let mut q = ListQuery::parse(List::Backends, &pairs(query)).unwrap();
        let (mut pages, mut totals) = (Vec::new(), Vec::new());
        loop {
            let p = page(m, List::Backends, &q, false, &keep, |v| *v);
            pages.push(p.items);
            totals.push(p.total);
            match p.next_cursor {
                Some(c) => q.after = decode_cursor(List::Backends, &c),
                None => return (pages, totals),
            }
            assert!(pages.len() < 100, "paging must end");
        }
    }

    #[test]
    fn pages_cover_every_item_once() {
        let m = map(&["a1", "a2", "a3", "b1", "b2", "c1", "c2"]);
        // No filter: pages of 3, the total is the map's size.
        let (pages, totals) = walk(&m, "limit=3", |_| true);
        assert_eq!(pages, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        assert_eq!(totals, vec![7, 7, 7]);
        // An exact fit has no empty last page.
        let (pages, _) = walk(&m, "limit=7", |_| true);
        assert_eq!(pages, vec![vec![0, 1, 2, 3, 4, 5, 6]]);
        // A prefix.
        let (pages, totals) = walk(&m, "limit=2&q=a", |_| true);
        assert_eq!(pages, vec![vec![0, 1], vec![2]]);
        assert_eq!(totals, vec![3, 3]);
        // A value filter (even values), with a prefix that matches nothing after it.
        let (pages, totals) = walk(&m, "limit=2&tag=x", |v| v % 2 == 0);
        assert_eq!(pages, vec![vec![0, 2], vec![4, 6]]);
        assert_eq!(totals, vec![4, 4]);
        let (pages, totals) = walk(&m, "q=zz", |_| true);
        assert_eq!((pages, totals), (vec![vec![]], vec![0]));
    }

    #[test]
    fn a_cursor_survives_the_deletion_of_its_item() {
        let mut m = map(&["a", "b", "c", "d"]);
        let q = ListQuery::parse(List::Backends, &pairs("limit=2")).unwrap();
        let first = page(&m, List::Backends, &q, false, |_| true, |v| *v);
        assert_eq!(first.items, vec![0, 1]);
        m.remove("b");
        let mut next = q.clone();
        next.after = decode_cursor(List::Backends, &first.next_cursor.unwrap());
        let second = page(&m, List::Backends, &next, false, |_| true, |v| *v);
        assert_eq!((second.items, second.next_cursor), (vec![2, 3], None));
    }
}
