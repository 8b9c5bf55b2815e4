//! Browsers as clients: gRPC-Web on the gRPC port, and the CORS rules that let a page of another
//! origin call it.
//!
//! Browsers cannot speak native gRPC (they expose no HTTP/2 trailers), so a call comes as
//! gRPC-Web, over HTTP/1.1 or HTTP/2, and `tonic-web` turns it into a gRPC call before anything
//! of roomctl sees it: authentication, limits, metrics and access lines are those of native
//! gRPC. A page served from another origin than the node's may call it only if its origin is
//! listed (`--cors-allow-origin`); with none listed no CORS header is ever sent, and browsers
//! refuse such pages' calls. Preflights of a listed origin allow what a gRPC-Web client sends
//! (`authorization` among it) and expose the gRPC status headers a browser must read.
//!
//! It knows HTTP and origins only, nothing of the service behind it.

use std::time::Duration;

use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// Request headers a gRPC-Web client sends beyond `authorization` and `content-type`.
const CLIENT_HEADERS: [&str; 4] = [
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "grpc-accept-encoding",
];

/// Response headers a browser page must be allowed to read: gRPC's status, which gRPC-Web sends
/// as headers when there is no body.
const STATUS_HEADERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

/// An origin pages may call from, as a browser sends it: `scheme://host[:port]`, `http` or
/// `https`, no path, no `*` (every origin must be named). It is written back as browsers
/// serialise origins (the `url` crate's, the WHATWG URL standard's): host in lower case, an
/// international name in punycode, without the scheme's default port. The value of
/// `--cors-allow-origin`.
pub fn parse_origin(text: &str) -> Result<HeaderValue, String> {
    let text = text.trim();
    let bad = |why: &str| {
        Err(format!(
            "{why}: expected an origin such as https://console.example.com or http://localhost:8080"
        ))
    };
    if text == "*" || text.eq_ignore_ascii_case("null") {
        return bad("every origin must be named, not `*` or `null`");
    }
    let url = match url::Url::parse(text) {
        Ok(url) => url,
        Err(e) => return bad(&format!("not an origin ({e})")),
    };
    if url.scheme() != "http" && url.scheme() != "https" {
        return bad("the scheme must be http or https");
    }
    let bare = url.path() == "/"
        && !text.ends_with('/')
        && url.query().is_none()
        && url.fragment().is_none()
        && url.username().is_empty()
        && url.password().is_none();
    if !bare {
        return bad("an origin is a scheme and a host (and a port), with no path");
    }
    HeaderValue::from_str(&url.origin().ascii_serialization())
        .or_else(|_| bad("not a header value"))
}

/// The CORS layer for `origins`; None when none is listed, so no CORS header is sent.
pub fn cors(origins: &[HeaderValue]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let names = |names: &[&'static str]| -> Vec<HeaderName> {
        names.iter().map(|n| HeaderName::from_static(n)).collect()
    };
    let mut allowed = names(&CLIENT_HEADERS);
    allowed.extend([AUTHORIZATION, CONTENT_TYPE]);
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins.iter().cloned()))
            .allow_methods([http::Method::POST])
            .allow_headers(allowed)
            .expose_headers(names(&STATUS_HEADERS))
            .max_age(PREFLIGHT_MAX_AGE),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_scheme_host_and_port_only() {
        for good in [
            "https://console.example.com",
            "http://localhost:8080",
            "http://127.0.0.1:3000",
            "https://[::1]:8443",
        ] {
            assert!(parse_origin(good).is_ok(), "{good}");
        }
        for bad in [
            "*",
            "null",
            "console.example.com",
            "ftp://example.com",
            "https://example.com/",
            "https://example.com/console",
            "https://",
            "https://exa mple.com",
            "http://a:99999",
            "https://user@example.com",
            "https://example.com?x",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
        // As browsers send them: lower case, no default port.
        for (given, sent) in [
            ("HTTPS://Console.Example.com", "https://console.example.com"),
            (
                "https://console.example.com:443",
                "https://console.example.com",
            ),
            ("http://localhost:80", "http://localhost"),
            ("http://localhost:443", "http://localhost:443"),
            (" http://localhost:8080", "http://localhost:8080"),
            ("https://bücher.example", "https://xn--bcher-kva.example"),
        ] {
            assert_eq!(parse_origin(given).unwrap(), sent, "{given}");
        }
    }
}
