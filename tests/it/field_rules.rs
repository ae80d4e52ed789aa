//! #13: one rule per field for the config file and the API. Each case goes through both: the
//! file (`--check` on a config holding the value) and the API (a create holding the same
//! value); they must agree, and a refusal must name the field.

use serde_json::json;

use crate::common::*;

/// (field, value, accepted?). Fields: "id", "tag", "address", "health_check_path", "domain".
const CASES: &[(&str, &str, bool)] = &[
    ("id", "web-v1", true),
    ("id", "Web_V1.2", true),
    ("id", "..", false),
    ("id", ".", false),
    ("id", "a/b", false),
    ("id", "a b", false),
    ("id", "", false),
    ("tag", "blue", true),
    ("tag", "blue green", false),
    ("tag", " ", false),
    ("tag", "..", false),
    ("address", "127.0.0.1:3001", true),
    ("address", "[::1]:8080", true),
    ("address", "web-1.internal:65535", true),
    ("address", "..:80", false),
    ("address", "-:80", false),
    ("address", "a..b:80", false),
    ("address", "999.999.999.999:80", false),
    ("address", "my_host:80", false),
    ("address", "127.0.0.1:+80", false),
    ("address", "x:0", false),
    // A scheme says plain or TLS to the backend; no other scheme, no path.
    ("address", "http://x:1", true),
    ("address", "https://x:1", true),
    ("address", "ftp://x:1", false),
    ("address", "https://x:1/api", false),
    ("health_check_path", "/ready", true),
    ("health_check_path", "", true),
    ("health_check_path", "ready", false),
    ("health_check_path", "/a b", false),
    ("domain", "example.com", true),
    ("domain", "*.example.com", true),
    ("domain", "xn--bcher-kva.de", true),
    ("domain", "1.2.3.4", false),
    ("domain", "xn--a.com", false),
    ("domain", "bücher.de", false),
    ("domain", "a..com", false),
];

fn long(n: usize) -> String {
    "a".repeat(n)
}

/// The config text for one case (a backend, plus a domain for domain/tag cases).
fn file_with(field: &str, value: &str) -> String {
    let mut backend = json!({"id": "b1", "address": "127.0.0.1:1", "tags": ["t"]});
    let mut vhost = json!({"domain": "d.test", "enabled_backends_tag": "t"});
    match field {
        "domain" => vhost["domain"] = json!(value),
        "tag" => {
            backend["tags"] = json!([value]);
            vhost["enabled_backends_tag"] = json!(value);
        }
        f => backend[f] = json!(value),
    }
    let toml_value = |v: &serde_json::Value| v.to_string(); // JSON strings are TOML strings
    let mut text = String::from("[[backends]]\n");
    for (k, v) in backend.as_object().expect("object") {
        text.push_str(&format!("{k} = {}\n", toml_value(v)));
    }
    text.push_str("[[virtual_hosts]]\n");
    for (k, v) in vhost.as_object().expect("object") {
        text.push_str(&format!("{k} = {}\n", toml_value(v)));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_and_the_api_accept_and_refuse_the_same_values() {
    let node = Node::start_default().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cases: Vec<(String, String, bool)> = CASES
        .iter()
        .map(|(f, v, ok)| (f.to_string(), v.to_string(), *ok))
        .collect();
    // Bounds: 63 characters pass, 64 do not.
    for f in ["id", "tag"] {
        cases.push((f.into(), long(63), true));
        cases.push((f.into(), long(64), false));
    }
    cases.push(("domain".into(), format!("{}.com", long(64)), false));
    let mut disagreements = Vec::new();
    for (i, (field, value, ok)) in cases.iter().enumerate() {
        // The file.
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, file_with(field, value)).expect("write");
        let out = run_check(&path).await;
        let file_ok = out.status.success();
        // The API: a backend (id, tag, address, path) or a domain (domain, tag).
        let api_field = if field == "tag" {
            "tags"
        } else {
            field.as_str()
        };
        let (status, body) = if field == "domain" {
            node.api_post(
                "/api/v1/domains",
                json!({"domain": value, "enabled_backends_tag": "t"}),
            )
            .await
        } else {
            let mut b = json!({"id": format!("case{i}"), "address": "127.0.0.1:1"});
            b[api_field] = if field == "tag" {
                json!([value])
            } else {
                json!(value)
            };
            node.api_post("/api/v1/backends", b).await
        };
        let api_ok = status == 201;
        if file_ok != *ok || api_ok != *ok {
            disagreements.push(format!(
                "{field} = {value:?}: want accepted={ok}, file {} ({}), API {status} ({body})",
                file_ok,
                out.stderr.trim()
            ));
            continue;
        }
        if !ok {
            let msg = body["error"].as_str().unwrap_or_default();
            if !msg.contains(&format!("`{api_field}")) {
                disagreements.push(format!(
                    "{field} = {value:?}: the API's 400 does not name the field: {body}"
                ));
            }
            if !out.stderr.contains(field.as_str()) && !out.stderr.contains(api_field) {
                disagreements.push(format!(
                    "{field} = {value:?}: --check does not name the field: {}",
                    out.stderr.trim()
                ));
            }
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}
