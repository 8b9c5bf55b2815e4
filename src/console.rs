//! The moderator console: a page of plain ES modules inside the binary, served on the gRPC
//! listener at `--console-path` (off unless set), that talks to the node over gRPC-Web like any
//! browser client, with the token its user pastes.
//!
//! Being on the gRPC port makes the page and the API one origin, so the console needs no CORS.
//! The page has no build step (no Node to build roomctl): its modules are served as written,
//! and the only generated one, `schema.js`, is the proto's message and enum layout read from the
//! descriptor set at startup, so the page encodes and decodes exactly what the service speaks,
//! with no field list kept by hand. Every answer carries a strict Content-Security-Policy (the
//! page's own scripts and styles only, calls to its own origin only, no framing).
//!
//! It serves files and nothing else: it neither calls the service nor sees a token, which the
//! page keeps in `sessionStorage` and sends in the `authorization` header of its calls.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{ready, Either, Ready};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use prost::bytes::Bytes;
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{json, Map, Value};
use tonic::body::Body;

use crate::pb;

/// The page's files, by name under the console's path (`""` is the page itself).
const ASSETS: [(&str, &str, &[u8]); 4] = [
    (
        "",
        "text/html; charset=utf-8",
        include_bytes!("../console/index.html"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/console.js"),
    ),
    (
        "grpcweb.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/grpcweb.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_bytes!("../console/console.css"),
    ),
];

/// The generated module: the layout of every message the page sends or reads.
const SCHEMA: &str = "schema.js";

/// The page may run its own scripts and styles and call its own origin, nothing else: no inline
/// script, no other host, no plugin, no framing, no form posted anywhere.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// Headers every answer of the console carries.
const SECURITY_HEADERS: [(&str, &str); 5] = [
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    // The files change with the binary; a browser asks again rather than run an old page
    // against a new node.
    ("cache-control", "no-cache"),
];

/// The value of `--console-path`: where on the gRPC listener the console is served. Lowercase
/// segments of letters, digits, `-` and `_`, so it cannot be a gRPC method's path (those name
/// a `package.Service`, with a dot); given with or without its trailing slash, kept with it.
pub fn parse_path(text: &str) -> Result<String, String> {
    let trimmed = text.trim().trim_end_matches('/');
    let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
    let segment_ok = |s: &&str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_'))
    };
    if !trimmed.starts_with('/') || segments.is_empty() || !segments.iter().all(segment_ok) {
        return Err(
            "expected a path such as /console/: segments of lowercase letters, digits, `-` and `_`"
                .into(),
        );
    }
    Ok(format!("{trimmed}/"))
}

/// The console's files, ready to serve under its path.
#[derive(Clone)]
pub struct Console {
    /// Where it is served, with its trailing slash (`/console/`).
    path: Arc<str>,
    schema: Bytes,
}

impl Console {
    /// The console served at `path` (as [`parse_path`] returns it).
    pub fn new(path: &str) -> Self {
        Self {
            path: path.into(),
            schema: Bytes::from(schema_module()),
        }
    }

    /// The answer to `request` if it is the console's, or None for the service to answer.
    fn answer<B>(&self, request: &Request<B>) -> Option<Response<Body>> {
        let path = request.uri().path();
        let name = path.strip_prefix(&*self.path)?;
        let (status, content_type, body) = if let Some((_, content_type, body)) =
            ASSETS.iter().find(|(asset, _, _)| *asset == name)
        {
            (StatusCode::OK, *content_type, Bytes::from_static(body))
        } else if name == SCHEMA {
            let content_type = "text/javascript; charset=utf-8";
            (StatusCode::OK, content_type, self.schema.clone())
        } else {
            let text = Bytes::from_static(b"not found\n");
            (StatusCode::NOT_FOUND, "text/plain; charset=utf-8", text)
        };
        let mut response = if request.method() == Method::GET {
            Response::new(Body::new(Full::new(body)))
        } else if request.method() == Method::HEAD {
            let mut response = Response::new(Body::empty());
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            response
        } else {
            let mut response = Response::new(Body::new(Full::new(Bytes::from_static(
                b"method not allowed\n",
            ))));
            *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return Some(with_security_headers(response));
        };
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        Some(with_security_headers(response))
    }

    /// A redirect from the path without its slash, so relative module paths resolve under it.
    fn redirect<B>(&self, request: &Request<B>) -> Option<Response<Body>> {
        let path = request.uri().path();
        if path != self.path.trim_end_matches('/') {
            return None;
        }
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
        let location = HeaderValue::from_str(&self.path).ok()?;
        response.headers_mut().insert(header::LOCATION, location);
        Some(with_security_headers(response))
    }
}

fn with_security_headers(mut response: Response<Body>) -> Response<Body> {
    for (name, value) in SECURITY_HEADERS {
        response
            .headers_mut()
            .insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Serves the console's paths and passes every other request on.
#[derive(Clone)]
pub struct ConsoleLayer(Console);

impl ConsoleLayer {
    /// A layer serving `console`.
    pub fn new(console: Console) -> Self {
        Self(console)
    }
}

impl<S> tower::Layer<S> for ConsoleLayer {
    type Service = ConsoleService<S>;

    fn layer(&self, inner: S) -> ConsoleService<S> {
        ConsoleService {
            console: self.0.clone(),
            inner,
        }
    }
}

/// The service of [`ConsoleLayer`].
#[derive(Clone)]
pub struct ConsoleService<S> {
    console: Console,
    inner: S,
}

impl<S> tower::Service<Request<Body>> for ConsoleService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let answer = self
            .console
            .answer(&request)
            .or_else(|| self.console.redirect(&request));
        match answer {
            Some(response) => Either::Left(ready(Ok(response))),
            None => Either::Right(self.inner.call(request)),
        }
    }
}

/// `schema.js`: `export default {service, methods, messages, enums}`, the layout of RoomControl
/// and of every message and enum it or its error details use, from the descriptor sets the
/// node serves by reflection.
fn schema_module() -> String {
    let mut pool = DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET)
        .expect("the built-in descriptor set decodes");
    pool.decode_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .expect("the google.rpc descriptor set decodes");
    let service = pool
        .get_service_by_name("roomcontrol.v1.RoomControl")
        .expect("the proto defines RoomControl");
    let methods: Map<String, Value> = service
        .methods()
        .map(|method| {
            let layout = json!({
                "path": format!("/{}/{}", service.full_name(), method.name()),
                "input": method.input().full_name(),
                "output": method.output().full_name(),
                "stream": method.is_server_streaming(),
            });
            (method.name().to_owned(), layout)
        })
        .collect();
    let messages: Map<String, Value> = pool
        .all_messages()
        .map(|message| (message.full_name().to_owned(), message_layout(&message)))
        .collect();
    let enums: Map<String, Value> = pool
        .all_enums()
        .map(|e| {
            let values: Map<String, Value> = e
                .values()
                .map(|v| (v.number().to_string(), Value::from(v.name())))
                .collect();
            (e.full_name().to_owned(), Value::Object(values))
        })
        .collect();
    let schema = json!({
        "service": service.full_name(),
        "methods": methods,
        "messages": messages,
        "enums": enums,
    });
    format!(
        "// Generated by roomctl from its descriptor sets: the layout of the messages it speaks.\n\
         export default {schema};\n"
    )
}

/// A message's fields: `[{name, number, kind, type?, repeated?, map?, oneof?, optional?}]`.
fn message_layout(message: &MessageDescriptor) -> Value {
    let fields: Vec<Value> = message.fields().map(|f| field_layout(&f)).collect();
    Value::Array(fields)
}

fn field_layout(field: &FieldDescriptor) -> Value {
    let (kind, type_name) = match field.kind() {
        Kind::Double => ("double", None),
        Kind::Float => ("float", None),
        Kind::Int32 => ("int32", None),
        Kind::Int64 => ("int64", None),
        Kind::Uint32 => ("uint32", None),
        Kind::Uint64 => ("uint64", None),
        Kind::Sint32 => ("sint32", None),
        Kind::Sint64 => ("sint64", None),
        Kind::Fixed32 => ("fixed32", None),
        Kind::Fixed64 => ("fixed64", None),
        Kind::Sfixed32 => ("sfixed32", None),
        Kind::Sfixed64 => ("sfixed64", None),
        Kind::Bool => ("bool", None),
        Kind::String => ("string", None),
        Kind::Bytes => ("bytes", None),
        Kind::Message(m) => ("message", Some(m.full_name().to_owned())),
        Kind::Enum(e) => ("enum", Some(e.full_name().to_owned())),
    };
    let mut layout = Map::new();
    layout.insert("name".into(), field.name().into());
    layout.insert("number".into(), field.number().into());
    layout.insert("kind".into(), kind.into());
    if let Some(type_name) = type_name {
        layout.insert("type".into(), type_name.into());
    }
    if field.is_map() {
        layout.insert("map".into(), true.into());
    } else if field.is_list() {
        layout.insert("repeated".into(), true.into());
    }
    match field.containing_oneof() {
        // proto3 `optional`: sent when set, even to its default (`after_seq = 0`).
        Some(oneof) if oneof.is_synthetic() => {
            layout.insert("optional".into(), true.into());
        }
        Some(oneof) => {
            layout.insert("oneof".into(), oneof.name().into());
        }
        None => {}
    }
    Value::Object(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_paths_cannot_be_a_grpc_method() {
        for (given, kept) in [
            ("/console", "/console/"),
            ("/console/", "/console/"),
            ("/ops/room-console", "/ops/room-console/"),
        ] {
            assert_eq!(parse_path(given).unwrap(), kept, "{given}");
        }
        for bad in [
            "",
            "/",
            "console",
            "/roomcontrol.v1.RoomControl",
            "/grpc.health.v1.Health/",
            "/Console",
            "/a//b",
            "/a b",
        ] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_schema_lays_out_every_method_and_its_messages() {
        let module = schema_module();
        let json = module
            .split_once("export default ")
            .and_then(|(_, rest)| rest.trim_end().strip_suffix(';'))
            .unwrap();
        let schema: Value = serde_json::from_str(json).unwrap();
        for method in pb::ROOM_CONTROL_METHODS {
            let layout = &schema["methods"][method];
            for side in ["input", "output"] {
                let name = layout[side].as_str().unwrap();
                assert!(schema["messages"][name].is_array(), "{method} {side}");
            }
        }
        assert_eq!(schema["methods"]["Events"]["stream"], true);
        assert!(schema["messages"]["google.rpc.ErrorInfo"].is_array());
        let event = schema["messages"]["roomcontrol.v1.Event"]
            .as_array()
            .unwrap();
        let dropped = event
            .iter()
            .find(|f| f["name"] == "room_disconnected")
            .unwrap();
        assert_eq!(dropped["oneof"], "payload");
        assert_eq!(dropped["type"], "roomcontrol.v1.RoomDisconnected");
    }
}
