//! The moderator console in a real browser: Debian's headless Chromium driven by Playwright
//! (see `common::browser`), against real nodes, with native gRPC clients in the same rooms.
//! A moderator sees a natively joined participant appear and drops them (their native stream
//! ends with the reason, the page shows `user_disconnected` then the ack); a participant's drop
//! is refused 5116; a lock refuses native joins; the page resumes without a gap across a
//! restart on Redis; and only listed origins' pages may call a node. Also: the console's files
//! are served only when asked, each with its security headers.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::browser::Browser;
use common::redis_server::{redis_available, RedisServer};
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use prost::bytes::Bytes;
use roomctl::auth::{mint, Claims};
use roomctl::pb::{self, event::Payload};
use roomctl::server::{ServerConfig, StoreConfig};
use tonic::Code;

const CONSOLE: &str = "/console/";

fn with_console() -> ServerConfig {
    let mut config = ServerConfig::new(SECRET);
    config.console_path = Some(CONSOLE.into());
    config
}

fn console_url(addr: SocketAddr) -> String {
    format!("http://{addr}{CONSOLE}")
}

/// Opens the console and gives it a token of `identity` as `role` (in room `demo`, or every
/// room for a service), as a user pastes it.
async fn sign_in(browser: &mut Browser, addr: SocketAddr, identity: &str, role: &str) {
    assert_eq!(browser.goto(&console_url(addr)).await, 200);
    let room = if role == "service" { "*" } else { "demo" };
    browser.fill("#token", &token(identity, room, role)).await;
    browser.click("#use-token").await;
}

/// A browser, and a node serving the console where bob has joined room `demo` natively;
/// None when the browser is missing and the tests were told to skip.
async fn demo_with_bob() -> Option<(Browser, Node, pb::JoinResponse)> {
    let browser = Browser::start().await?;
    let node = Node::start(with_console()).await;
    let (_, bob) = native_join(node.addr, "demo", "bob").await;
    Some((browser, node, bob))
}

/// A native join of `client` to room `demo`, refused.
async fn refused_join(client: &mut Client, name: &str) -> tonic::Status {
    let request = pb::JoinRequest {
        room_id: "demo".into(),
        name: name.into(),
        ..Default::default()
    };
    client.join(request).await.unwrap_err()
}

/// The kinds of the events the page logged, in order.
async fn logged_kinds(browser: &mut Browser) -> Vec<String> {
    let kinds = browser
        .eval(
            "Array.from(document.querySelectorAll('#events li[data-kind]'), li => li.dataset.kind)",
        )
        .await;
    serde_json::from_value(kinds).unwrap()
}

/// The seqs of the events the page logged, in order.
async fn logged_seqs(browser: &mut Browser) -> Vec<u64> {
    let seqs = browser
        .eval("Array.from(document.querySelectorAll('#events li[data-seq]'), li => Number(li.dataset.seq))")
        .await;
    serde_json::from_value(seqs).unwrap()
}

/// The page reported no problem (but those containing one of `expected`), and its log never
/// saw an event out of order.
async fn assert_clean(browser: &mut Browser, expected: &[&str]) {
    let problems: Vec<String> = browser
        .problems()
        .await
        .into_iter()
        .filter(|p| !expected.iter().any(|e| p.contains(e)))
        .collect();
    assert_eq!(problems, Vec::<String>::new());
    let log = browser.texts("#events li").await;
    assert!(!log.iter().any(|l| l.contains("out of order")), "{log:#?}");
}

/// The selector of the Drop button in a participant's row.
fn drop_button(client_id: &str) -> String {
    format!("{} button.drop", row(client_id))
}

/// The selector of a participant's row.
fn row(client_id: &str) -> String {
    format!("#participants tr[data-client-id=\"{client_id}\"]")
}

async fn native_join(addr: SocketAddr, room: &str, identity: &str) -> (Client, pb::JoinResponse) {
    let mut client = client_with_token(addr, &token(identity, room, "participant")).await;
    let joined = join(&mut client, room, identity).await;
    (client, joined)
}

#[tokio::test]
async fn a_moderator_watches_a_room_and_drops_a_participant() {
    let Some((mut browser, node, _)) = demo_with_bob().await else {
        return;
    };
    sign_in(&mut browser, node.addr, "alice", "moderator").await;
    browser.wait_text("#stream-state", "live").await;
    browser.wait_text("#participants", "bob").await;

    // Joined natively while the page watches: it appears from the event, live.
    let (mut carol, joined) = native_join(node.addr, "demo", "carol").await;
    browser.wait_text(&row(&joined.client_id), "carol").await;
    let mut carol_events = subscribe(&mut carol, "demo", &joined.client_id, Some(joined.seq))
        .await
        .unwrap();
    browser
        .wait_text(&format!("{} .connected", row(&joined.client_id)), "yes")
        .await;

    for more in ["dan", "erin"] {
        let (_, more_joined) = native_join(node.addr, "demo", more).await;
        browser.wait_text(&row(&more_joined.client_id), more).await;
    }

    browser.fill("#reason", "off topic").await;
    browser.click(&drop_button(&joined.client_id)).await;
    // Carol's own native stream is told why, then ends.
    let told = loop {
        let event = next_event(&mut carol_events).await;
        match event.payload {
            Some(Payload::RoomDisconnected(told)) => break told,
            Some(Payload::UserConnected(_)) => continue,
            _ => panic!("carol got {event:?}"),
        }
    };
    assert_eq!(told.message, "off topic");
    assert_eq!(told.reason, pb::DisconnectReason::DroppedByModerator as i32);
    stream_end(&mut carol_events).await.unwrap();
    // The page: user_disconnected, then the moderator's ack; carol gone from the table.
    browser.wait_text("#events li", "ack_drop_user").await;
    browser.wait_text("#result", "DROPPED").await;
    let kinds = logged_kinds(&mut browser).await;
    let gone = kinds.iter().position(|k| k == "user_disconnected");
    let ack = kinds.iter().position(|k| k == "ack_drop_user");
    assert!(gone.is_some() && gone < ack, "{kinds:?}");
    browser.wait_count(&row(&joined.client_id), 0).await;
    // docs/console.png is this page: `ROOMCTL_CONSOLE_SCREENSHOT=docs/console.png cargo test
    // --test console a_moderator` takes it again.
    if let Some(path) = std::env::var_os("ROOMCTL_CONSOLE_SCREENSHOT") {
        browser.screenshot(std::path::Path::new(&path)).await;
    }

    // The token stays in the tab's sessionStorage, never in the address.
    let stored = browser
        .run(serde_json::json!({"op": "sessionStorage"}))
        .await;
    assert!(stored.as_str().unwrap().contains("roomctl.console.token"));
    let url = browser.run(serde_json::json!({"op": "url"})).await;
    assert_eq!(url, console_url(node.addr));
    assert_clean(&mut browser, &[]).await;
}

#[tokio::test]
async fn a_participant_is_refused_5116_and_a_moderator_locks_bans_and_ends_the_session() {
    let Some((mut browser, node, bob)) = demo_with_bob().await else {
        return;
    };

    // A participant's token: the room opens (any token may list it), dropping is refused.
    sign_in(&mut browser, node.addr, "dave", "participant").await;
    browser.wait_text(&row(&bob.client_id), "bob").await;
    browser.click(&drop_button(&bob.client_id)).await;
    browser
        .wait_text("#result", "5116: Unauthorized Access")
        .await;
    browser.wait_text("#result", "PERMISSION_DENIED").await;

    // A moderator locks: a native participant join is refused ROOM_LOCKED; unlocking lets it.
    sign_in(&mut browser, node.addr, "alice", "moderator").await;
    browser.wait_text("#stream-state", "live").await;
    browser.click("#lock").await;
    browser.wait_text("#lock-state", "locked").await;
    browser.wait_text("#events li", "room_locked").await;
    let mut erin = client_with_token(node.addr, &token("erin", "demo", "participant")).await;
    let refused = refused_join(&mut erin, "erin").await;
    assert_error(&refused, Code::FailedPrecondition, "ROOM_LOCKED");
    browser.click("#lock").await;
    browser.wait_text("#result", "5117").await;
    browser.click("#unlock").await;
    browser.wait_text("#lock-state", "open").await;
    let erin_joined = join(&mut erin, "demo", "erin").await;
    browser
        .wait_text(&row(&erin_joined.client_id), "erin")
        .await;

    // A drop with a ban lists the ban; unbanning lifts it.
    browser.fill("#ban-seconds", "600").await;
    browser.click(&drop_button(&erin_joined.client_id)).await;
    browser.wait_text("#bans", "erin").await;
    browser.wait_text("#events li", "user_banned").await;
    let banned = refused_join(&mut erin, "erin").await;
    assert_error(&banned, Code::PermissionDenied, "BANNED");
    browser
        .click("#bans tr[data-identity=\"erin\"] button.unban")
        .await;
    browser.wait_text("#events li", "user_unbanned").await;
    join(&mut erin, "demo", "erin").await;

    // Ending the session empties the room for everyone.
    browser.fill("#reason", "time is up").await;
    browser.click("#end-session").await;
    browser.wait_text("#events li", "session_destroyed").await;
    browser.wait_text("#result", "ended at seq").await;
    browser.wait_count("#participants tbody tr", 0).await;
    let mut service = node.client("ops", "*", "service").await;
    let left = service
        .list_participants(pb::ListParticipantsRequest {
            room_id: "demo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(left.participants.is_empty(), "{left:?}");
    assert_clean(&mut browser, &[]).await;
}

#[tokio::test]
async fn a_room_opened_before_it_exists_appears_once_joined_and_a_forbidden_one_shows_nothing() {
    let Some(mut browser) = Browser::start().await else {
        return;
    };
    let node = Node::start(with_console()).await;
    sign_in(&mut browser, node.addr, "alice", "moderator").await;
    browser
        .wait_text("#stream-state", "waiting for the room")
        .await;
    let (_, bob) = native_join(node.addr, "demo", "bob").await;
    browser.wait_text(&row(&bob.client_id), "bob").await;
    browser.wait_text("#stream-state", "live").await;

    // Another room is not this token's: refused, and nothing of room demo stays on show.
    native_join(node.addr, "other", "carol").await;
    browser.fill("#open-room", "other").await;
    browser.click("#open-form button").await;
    browser.wait_text("#stream-state", "refused").await;
    browser.wait_text("#result", "PERMISSION_DENIED").await;
    browser.wait_count("#participants tbody tr", 0).await;
    browser.wait_text("#lock-state", "unknown").await;
    browser.wait_text("#cursor-seq", "-").await;

    // A ban the page cannot send is refused by the page, before any call.
    browser.fill("#open-room", "demo").await;
    browser.click("#open-form button").await;
    browser.wait_text(&row(&bob.client_id), "bob").await;
    for bad in ["1.5", "-5", "2592001"] {
        browser.fill("#ban-seconds", bad).await;
        browser.click(&drop_button(&bob.client_id)).await;
        browser
            .wait_text("#result", "Ban for: a whole number")
            .await;
    }
    browser.wait_text(&row(&bob.client_id), "bob").await;
    assert_clean(&mut browser, &[]).await;
}

#[tokio::test]
async fn a_burst_of_joins_is_shown_whole_and_the_log_stays_bounded() {
    let Some((mut browser, node, _)) = demo_with_bob().await else {
        return;
    };
    sign_in(&mut browser, node.addr, "alice", "moderator").await;
    browser.wait_text("#stream-state", "live").await;
    // More events than the page's log keeps (1,000 lines), in batches of 20 joins at once, so
    // frames of the page see many events each.
    let service = node.client("ops", "*", "service").await;
    let mut last = 0;
    for batch in 0..55 {
        let mut joins = tokio::task::JoinSet::new();
        for n in batch * 20..batch * 20 + 20 {
            let mut service = service.clone();
            joins.spawn(async move {
                let request = pb::JoinRequest {
                    room_id: "demo".into(),
                    name: format!("guest-{n}"),
                    identity: format!("guest-{n}"),
                    ..Default::default()
                };
                service.join(request).await.unwrap().into_inner().seq
            });
        }
        while let Some(seq) = joins.join_next().await {
            last = last.max(seq.unwrap());
        }
    }
    browser.wait_text("#cursor-seq", &last.to_string()).await;
    browser.wait_text("#participants", "guest-1099").await;
    browser.wait_count("#participants tbody tr", 1101).await;
    // The log still follows its newest line after the burst.
    browser
        .wait_for(
            "() => { const l = document.querySelector('#events'); \
             return l.scrollHeight - l.scrollTop - l.clientHeight < 40; }",
        )
        .await;
    assert_eq!(browser.texts("#events li").await.len(), 1000);
    assert_eq!(logged_seqs(&mut browser).await.last(), Some(&last));
    assert_clean(&mut browser, &[]).await;
}

#[tokio::test]
async fn a_new_token_for_the_room_resumes_where_the_expired_one_stopped() {
    let Some((mut browser, node, _)) = demo_with_bob().await else {
        return;
    };
    assert_eq!(browser.goto(&console_url(node.addr)).await, 200);
    let soon = Claims::new("alice", "demo", "moderator", Duration::from_secs(3));
    browser.fill("#token", &mint(SECRET, &soon)).await;
    browser.click("#use-token").await;
    browser.wait_text("#stream-state", "live").await;
    // The stream ends UNAUTHENTICATED with the token; the room goes on meanwhile.
    browser.wait_text("#stream-state", "refused").await;
    browser.wait_text("#result", "UNAUTHENTICATED").await;
    let (_, carol) = native_join(node.addr, "demo", "carol").await;
    browser
        .fill("#token", &token("alice", "demo", "moderator"))
        .await;
    browser.click("#use-token").await;
    browser.wait_text(&row(&carol.client_id), "carol").await;
    browser
        .wait_text("#events li", "resumed with a new token")
        .await;
    let seqs = logged_seqs(&mut browser).await;
    assert_eq!(seqs.last(), Some(&carol.seq));
    assert_clean(&mut browser, &[]).await;
}

#[tokio::test]
async fn a_service_token_lists_rooms_page_by_page() {
    let Some(mut browser) = Browser::start().await else {
        return;
    };
    let node = Node::start(with_console()).await;
    for n in 0..60 {
        native_join(node.addr, &format!("room-{n:02}"), "bob").await;
    }
    sign_in(&mut browser, node.addr, "ops", "service").await;
    browser.wait_text("#rooms", "room-49").await;
    assert_eq!(browser.texts("#rooms tbody tr").await.len(), 50);
    browser.click("#more-rooms").await;
    browser.wait_text("#rooms", "room-59").await;
    assert_eq!(browser.texts("#rooms tbody tr").await.len(), 60);
    browser
        .click("#rooms tr[data-room-id=\"room-07\"] button")
        .await;
    browser.wait_text("#room-id", "room-07").await;
    browser.wait_text("#participants", "bob").await;
    assert_clean(&mut browser, &[]).await;
}

/// A page watching a room on a node of a Redis store while that node restarts and `joins`
/// participants join through another node meanwhile, the page's node keeping `history` events
/// per room. Returns the page once the last of them and one more, joined after the restart,
/// are shown, and that last join's seq.
async fn restart_under_the_page(history: usize, joins: usize) -> Option<(Browser, u64)> {
    if !redis_available() {
        return None;
    }
    let mut browser = Browser::start().await?;
    let redis = RedisServer::start().await;
    let mut config = with_console();
    config.store = StoreConfig::redis(redis.url());
    config.rooms.history = history;
    let node = Node::start(config.clone()).await;
    let other = Node::start(config.clone()).await;
    let addr = node.addr;
    native_join(addr, "demo", "bob").await;
    sign_in(&mut browser, addr, "alice", "moderator").await;
    browser.wait_text("#stream-state", "live").await;
    let (_, before) = native_join(addr, "demo", "carol").await;
    browser.wait_text(&row(&before.client_id), "carol").await;

    // The page's node goes away; the room goes on through another node meanwhile.
    node.stop().await.unwrap();
    browser.wait_text("#stream-state", "reconnecting").await;
    let mut during = Vec::new();
    for n in 0..joins {
        during.push(native_join(other.addr, "demo", &format!("dan-{n}")).await.1);
    }
    let node = Node::start_on(config, addr).await;
    for joined in &during {
        browser
            .wait_text(
                &row(&joined.client_id),
                &joined.participant.as_ref().unwrap().name,
            )
            .await;
    }
    let (_, after) = native_join(node.addr, "demo", "erin").await;
    browser.wait_text(&row(&after.client_id), "erin").await;
    Some((browser, after.seq))
}

#[tokio::test]
async fn the_page_resumes_without_a_gap_after_its_node_restarts_on_redis() {
    let Some((mut browser, last)) = restart_under_the_page(100, 2).await else {
        return;
    };
    browser.wait_text("#events li", "nothing missed").await;
    browser.wait_text("#stream-state", "live").await;
    let seqs = logged_seqs(&mut browser).await;
    let contiguous: Vec<u64> = (seqs[0]..seqs[0] + seqs.len() as u64).collect();
    assert_eq!(seqs, contiguous, "a gap or a repeat in the page's log");
    assert_eq!(seqs.last(), Some(&last));
    assert!(!browser
        .texts("#events li")
        .await
        .iter()
        .any(|t| t.contains("resynced")));
    // Chromium reports each refused connection while the node was away; nothing else.
    assert_clean(&mut browser, &["ERR_CONNECTION_REFUSED"]).await;
}

#[tokio::test]
async fn the_page_resyncs_and_says_so_when_the_log_moved_past_it() {
    // Five joins while away, in a log that keeps three events: the cursor is out of it.
    let Some((mut browser, last)) = restart_under_the_page(3, 5).await else {
        return;
    };
    browser.wait_text("#events li", "resynced").await;
    browser.wait_text("#result", "events were missed").await;
    browser
        .wait_count("#participants tbody tr", 2 + 5 + 1)
        .await;
    let seqs = logged_seqs(&mut browser).await;
    assert_eq!(seqs.last(), Some(&last));
    let log = browser.texts("#events li").await;
    let resynced = log.iter().position(|l| l.contains("resynced")).unwrap();
    assert!(
        !log[resynced..].iter().any(|l| l.contains("nothing missed")),
        "a resync is no resume: {log:#?}"
    );
    assert_clean(&mut browser, &["ERR_CONNECTION_REFUSED"]).await;
}

/// A page of no console, on an origin of its own: a bare HTML page from a listener of the test.
async fn plain_page() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let service = hyper::service::service_fn(|_request| async {
                let page = http_body_util::Full::new(Bytes::from_static(
                    b"<!doctype html><title>elsewhere</title>",
                ));
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .header("content-type", "text/html")
                        .body(page)
                        .unwrap(),
                )
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service),
            );
        }
    });
    addr
}

#[tokio::test]
async fn only_pages_of_listed_origins_may_call_a_node() {
    let Some(mut browser) = Browser::start().await else {
        return;
    };
    let page = plain_page().await;
    let origin = format!("http://{page}");
    let listing = |origins: &[&str]| {
        let mut config = ServerConfig::new(SECRET);
        config.cors_allow_origins = origins.iter().map(|o| o.parse().unwrap()).collect();
        config
    };
    let listed = Node::start(listing(&[&origin])).await;
    let unlisted = Node::start(listing(&["https://console.example.com"])).await;
    let none = Node::start(ServerConfig::new(SECRET)).await;
    browser.goto(&format!("{origin}/")).await;

    // A call as a gRPC-Web client sends it; what the page can read of the answer: the status
    // in the headers (a refusal) or in the body's trailer frame (a success).
    let call = |addr: SocketAddr, token: &str| {
        format!(
            "fetch('http://{addr}/roomcontrol.v1.RoomControl/ListRooms', {{ method: 'POST', \
             headers: {{ 'content-type': 'application/grpc-web+proto', 'x-grpc-web': '1', \
             authorization: 'Bearer {token}' }}, body: new Uint8Array(5) }}) \
             .then(async r => r.headers.get('grpc-status') ?? \
                 new TextDecoder().decode(await r.arrayBuffer()).match(/grpc-status:(\\d+)/)[1], \
               e => 'refused: ' + e.message)"
        )
    };
    let service = token("ops", "*", "service");
    assert_eq!(browser.eval(&call(listed.addr, &service)).await, "0");
    // A refusal's status is in headers, which CORS must expose for the page to read it.
    assert_eq!(browser.eval(&call(listed.addr, "forged")).await, "16");
    for refusing in [unlisted.addr, none.addr] {
        let answer = browser.eval(&call(refusing, &service)).await;
        assert_eq!(answer, "refused: Failed to fetch", "{refusing}");
    }
}

/// An HTTP/1.1 request to `addr`: its status, headers and body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, http::HeaderMap, Bytes) {
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = http1(addr, request).await;
    let (head, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (head.status.as_u16(), head.headers, body)
}

/// The files a console file names: a page's `src` and `href`, a module's imports.
fn named_files(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for marker in ["src=\"", "href=\"", "from \"./"] {
        for (at, _) in text.match_indices(marker) {
            let rest = &text[at + marker.len()..];
            let name = rest[..rest.find('"').unwrap()].trim_start_matches("./");
            // `data:` addresses are inline, not files.
            if !name.contains(':') {
                names.push(name.to_owned());
            }
        }
    }
    names
}

#[tokio::test]
async fn the_console_is_served_only_when_asked_with_its_security_headers() {
    let off = Node::start(ServerConfig::new(SECRET)).await;
    let (_, headers, _) = http(off.addr, "GET", CONSOLE).await;
    assert!(
        headers.get("content-security-policy").is_none(),
        "{headers:?}"
    );

    let node = Node::start(with_console()).await;
    // Every file the page names, and every file those name, is served with the headers.
    let mut to_fetch = vec![String::new()];
    let mut seen = Vec::new();
    while let Some(name) = to_fetch.pop() {
        if seen.contains(&name) {
            continue;
        }
        let (status, headers, body) = http(node.addr, "GET", &format!("{CONSOLE}{name}")).await;
        assert_eq!(status, 200, "{name}");
        let policy = headers["content-security-policy"].to_str().unwrap();
        assert!(policy.contains("default-src 'none'"), "{policy}");
        assert!(policy.contains("script-src 'self'"), "{policy}");
        assert!(!policy.contains("unsafe-inline"), "{policy}");
        assert_eq!(headers["x-frame-options"], "DENY");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let text = String::from_utf8(body.to_vec()).unwrap();
        // Nothing reaches outside the node: no address of another host in any file.
        assert!(
            !text.contains("http://") && !text.contains("https://"),
            "{name}"
        );
        to_fetch.extend(named_files(&text));
        seen.push(name);
    }
    for file in ["console.js", "grpcweb.js", "schema.js", "console.css"] {
        assert!(
            seen.iter().any(|s| s == file),
            "{file} never named: {seen:?}"
        );
    }
    let (status, headers, _) = http(node.addr, "GET", "/console").await;
    assert_eq!(
        (status, &headers["location"]),
        (308, &"/console/".parse().unwrap())
    );
    let (status, _, _) = http(node.addr, "GET", "/console/nothing.js").await;
    assert_eq!(status, 404);
    let (status, headers, _) = http(node.addr, "POST", CONSOLE).await;
    assert_eq!(
        (status, &headers["allow"]),
        (405, &"GET, HEAD".parse().unwrap())
    );
    let (_, _, page) = http(node.addr, "GET", CONSOLE).await;
    let (status, headers, body) = http(node.addr, "HEAD", CONSOLE).await;
    assert_eq!((status, body.len()), (200, 0));
    assert_eq!(headers["content-length"], page.len().to_string().as_str());
}
