//! gRPC-Web, as browsers speak it, on the gRPC port: every RoomControl method (walked from the
//! service descriptor, so a method added to the proto is covered without anyone adding it here)
//! answers over HTTP/1.1 gRPC-Web exactly what it answers over native gRPC, authenticated,
//! counted and logged the same; the mission's drop works end to end over it, its `Events`
//! stream included; and CORS answers only the origins it is given.

mod common;

use bytes::{Buf, Bytes, BytesMut};
use common::node_process::LoggedNode;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use roomctl::pb::room_control_client::RoomControlClient;
use roomctl::pb::{self, event::Payload};
use tonic::service::interceptor::InterceptedService;
use tonic::{Code, Status};

/// A gRPC-Web call over HTTP/1.1, framed as a browser's gRPC-Web client frames it.
async fn web_call(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    message: &[u8],
) -> http::Response<Incoming> {
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    http1(addr, request.body(Full::new(Bytes::from(framed))).unwrap()).await
}

/// How a gRPC-Web call ended: the status in the response's headers (a trailers-only answer) or
/// in the trailer frame that ends its body.
async fn web_status(response: http::Response<Incoming>) -> Status {
    let (head, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    status_of(head, body)
}

/// The same, for a response read whole: its head and its body.
fn status_of(head: http::response::Parts, body: Bytes) -> Status {
    assert_eq!(head.status, 200, "{head:?}");
    let content_type = head.headers.get("content-type").unwrap();
    assert_eq!(content_type, "application/grpc-web+proto");
    if let Some(status) = Status::from_header_map(&head.headers) {
        return status;
    }
    let mut body = BytesMut::from(&body[..]);
    while body.len() >= 5 {
        let flag = body.get_u8();
        let len = body.get_u32() as usize;
        let frame = body.split_to(len);
        if flag & 0x80 != 0 {
            let mut trailers = http::HeaderMap::new();
            for line in std::str::from_utf8(&frame).unwrap().split("\r\n") {
                if let Some((name, value)) = line.split_once(':') {
                    trailers.insert(
                        http::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
                        value.trim().parse().unwrap(),
                    );
                }
            }
            return Status::from_header_map(&trailers).expect("grpc-status in the trailers");
        }
    }
    panic!("a gRPC-Web body without its trailer frame")
}

/// A gRPC-Web call over HTTP/2 (as a browser makes it over TLS), on `h2`: how it ended.
async fn web_call_h2(
    h2: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    headers: &[(&str, &str)],
) -> Status {
    let mut request = http::Request::post(format!("http://roomctl{path}"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut send) = h2.send_request(request.body(()).unwrap(), false).unwrap();
    send.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let (head, mut body) = response.await.unwrap().into_parts();
    let mut read = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        read.extend_from_slice(&chunk);
    }
    status_of(head, read.freeze())
}

/// Every method, called with an empty message over native gRPC and over gRPC-Web (HTTP/1.1 and
/// HTTP/2) with the same token, answers all three the same (code, message and details), and
/// without a token over gRPC-Web `UNAUTHENTICATED`; each call is counted in `roomctl_rpcs_total` and leaves its access line.
#[tokio::test]
async fn every_method_answers_over_grpc_web_as_over_grpc() {
    let node = LoggedNode::with_metrics().await;
    let bearer = format!("Bearer {}", token("ops", "*", "service"));
    let authorized = [("authorization", bearer.as_str())];
    let mut h2 = bare::connect(node.addr).await;
    let methods = room_control_methods();
    let mut answered = Vec::new();
    for method in &methods {
        let path = format!("/roomcontrol.v1.RoomControl/{method}");
        let native = bare::call(&mut h2, bare::request(&path, &authorized, &())).await;
        let web = web_status(web_call(node.addr, &path, &authorized, &[]).await).await;
        let web_h2 = web_call_h2(&mut h2, &path, &authorized).await;
        for web in [web, web_h2] {
            assert_eq!(
                (web.code(), web.message(), web.details()),
                (native.code(), native.message(), native.details()),
                "{method}"
            );
        }
        let anonymous = web_status(web_call(node.addr, &path, &[], &[]).await).await;
        assert_error(&anonymous, Code::Unauthenticated, "UNAUTHENTICATED");
        answered.push(native.code());
    }
    assert!(
        answered.contains(&Code::Ok) && answered.contains(&Code::InvalidArgument),
        "some calls succeed, some are refused: {answered:?}"
    );

    let text = scrape(node.metrics.unwrap()).await;
    let names: Vec<&str> = answered
        .iter()
        .map(|c| roomctl::telemetry::code_name(*c))
        .collect();
    for (method, code) in methods.iter().zip(&names) {
        let series = format!("roomctl_rpcs_total{{method=\"{method}\",code=\"{code}\"}}");
        assert_eq!(metric(&text, &series), 3.0, "{series} in\n{text}");
    }
    let lines = node.stop().await;
    for (method, code) in methods.iter().zip(&names) {
        let mut codes = access_codes(&lines, method);
        codes.sort();
        let mut expected = vec![*code, *code, *code, "UNAUTHENTICATED"];
        expected.sort();
        assert_eq!(codes, expected, "{method}");
    }
}

/// The typed client [`web_client`] makes.
type WebClient = RoomControlClient<
    InterceptedService<
        tonic_web::GrpcWebClientService<
            hyper_util::client::legacy::Client<
                hyper_util::client::legacy::connect::HttpConnector,
                tonic_web::GrpcWebCall<tonic::body::Body>,
            >,
        >,
        roomctl::client::Bearer,
    >,
>;

/// A typed RoomControl client that speaks gRPC-Web over HTTP/1.1 (tonic-web's client layer, as
/// a browser's client would), with `token`.
fn web_client(addr: std::net::SocketAddr, token: &str) -> WebClient {
    let http1 = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let web = tonic_web::GrpcWebClientService::new(http1);
    let bearer = roomctl::client::Bearer::new(token).unwrap();
    let origin = format!("http://{addr}").parse().unwrap();
    RoomControlClient::with_origin(InterceptedService::new(web, bearer), origin)
}

/// The mission over gRPC-Web alone: a participant joins and follows its `Events` stream over
/// HTTP/1.1, a moderator drops it; the participant is told why and its stream ends, the
/// moderator's own stream sees `user_disconnected` then the ack, and a participant pressing drop
/// gets 5116.
#[tokio::test]
async fn the_mission_works_over_grpc_web() {
    let server = TestServer::start(Backend::Memory).await;
    let mut bob = web_client(server.addr, &token("bob", "standup", "participant"));
    let mut alice = web_client(server.addr, &token("alice", "standup", "moderator"));
    let joined = bob
        .join(pb::JoinRequest {
            room_id: "standup".into(),
            name: "Bob".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let events = |client_id: &str, after_seq| pb::EventsRequest {
        room_id: "standup".into(),
        client_id: client_id.into(),
        after_seq,
        epoch: String::new(),
    };
    let mut bob_events = bob
        .events(events(&joined.client_id, Some(joined.seq)))
        .await
        .unwrap()
        .into_inner();
    let mut alice_events = alice
        .events(events("", Some(joined.seq)))
        .await
        .unwrap()
        .into_inner();

    let refused = bob
        .drop_user(drop_request("standup", &[&joined.client_id], "me"))
        .await
        .unwrap_err();
    let info = assert_error(&refused, Code::PermissionDenied, "UNAUTHORIZED_ACCESS");
    assert_eq!(info["code"], "5116");

    alice
        .drop_user(drop_request("standup", &[&joined.client_id], "off-topic"))
        .await
        .unwrap();
    let told = next_event(&mut bob_events).await;
    let Some(Payload::RoomDisconnected(disconnected)) = &told.payload else {
        panic!("expected room_disconnected, got {told:?}")
    };
    assert_eq!(
        disconnected.reason(),
        pb::DisconnectReason::DroppedByModerator
    );
    assert_eq!(disconnected.message, "off-topic");
    assert!(stream_end(&mut bob_events).await.is_ok());
    let seen = [
        kind(&next_event(&mut alice_events).await),
        kind(&next_event(&mut alice_events).await),
    ];
    assert_eq!(seen, ["user_disconnected", "ack_drop_user"]);
}

/// The answer to a preflight from `origin`: its status and headers.
async fn preflight(addr: std::net::SocketAddr, origin: &str) -> http::Response<Incoming> {
    let request =
        http::Request::options(format!("http://{addr}/roomcontrol.v1.RoomControl/DropUser"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type,x-grpc-web,x-user-agent,grpc-timeout",
            )
            .body(Full::new(Bytes::new()))
            .unwrap();
    http1(addr, request).await
}

fn header<'a>(response: &'a http::Response<Incoming>, name: &str) -> Option<&'a str> {
    response.headers().get(name).map(|v| v.to_str().unwrap())
}

/// With origins listed, a preflight of a listed origin allows what a gRPC-Web client sends and a
/// call exposes gRPC's status headers; an unlisted origin gets no CORS header, so a browser
/// refuses its page's call; with none listed, no origin gets one.
#[tokio::test]
async fn cors_answers_only_the_listed_origins() {
    let node = LoggedNode::start(node_process::serve(&[
        "--listen",
        "127.0.0.1:0",
        "--cors-allow-origin",
        "https://console.example",
        "--cors-allow-origin",
        "http://localhost:8080",
    ]))
    .await;
    for origin in ["https://console.example", "http://localhost:8080"] {
        let allowed = preflight(node.addr, origin).await;
        assert_eq!(allowed.status(), 200);
        assert_eq!(
            header(&allowed, "access-control-allow-origin"),
            Some(origin)
        );
        let headers = header(&allowed, "access-control-allow-headers").unwrap();
        for needed in [
            "authorization",
            "content-type",
            "x-grpc-web",
            "grpc-timeout",
        ] {
            assert!(headers.contains(needed), "{needed} in {headers}");
        }
    }
    let call = web_call(
        node.addr,
        "/roomcontrol.v1.RoomControl/ListRooms",
        &[("origin", "https://console.example")],
        &[],
    )
    .await;
    let exposed = header(&call, "access-control-expose-headers").unwrap();
    for needed in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(exposed.contains(needed), "{needed} in {exposed}");
    }
    let refused = preflight(node.addr, "https://evil.example").await;
    assert_eq!(header(&refused, "access-control-allow-origin"), None);
    node.stop().await;

    let without = LoggedNode::start(node_process::serve(&["--listen", "127.0.0.1:0"])).await;
    let answer = preflight(without.addr, "https://console.example").await;
    assert_eq!(header(&answer, "access-control-allow-origin"), None);
    without.stop().await;
}

/// Observer streams open, as a node's metrics count them.
const OBSERVERS_OPEN: &str = "roomctl_events_streams_open{kind=\"observer\"}";

/// An `Events` stream over HTTP/1.1 whose client sent more bytes after its request (hyper then
/// holds them and stops reading the socket) and hung up is ended, its slot given back, though
/// its quiet room has nothing to send that would find the socket closed: an attack held every
/// stream slot of a node that way with one token.
#[tokio::test]
async fn an_http1_stream_whose_client_hung_up_is_ended() {
    use prost::Message;
    use tokio::io::AsyncWriteExt;
    let node = LoggedNode::with_metrics().await;
    let metrics = node.metrics.unwrap();
    let moderator = token("alice", "quiet", "moderator");
    let mut alice = client_with_token(node.addr, &moderator).await;
    join(&mut alice, "quiet", "Alice").await;
    let request = pb::EventsRequest {
        room_id: "quiet".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(request.len() as u32).to_be_bytes());
    framed.extend_from_slice(&request);
    let head = format!(
        "POST /roomcontrol.v1.RoomControl/Events HTTP/1.1\r\nhost: roomctl\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n\
         authorization: Bearer {moderator}\r\ncontent-length: {}\r\n\r\n",
        framed.len()
    );
    let mut tcp = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&framed).await.unwrap();
    until_metric(metrics, OBSERVERS_OPEN, 1.0).await;
    // The start of a next request, pipelined: hyper holds it and reads no further.
    tcp.write_all(b"POST /").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    drop(tcp);
    until_metric(metrics, OBSERVERS_OPEN, 0.0).await;
    node.stop().await;
}
