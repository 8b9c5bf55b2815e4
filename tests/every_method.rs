//! Rules that hold for every RoomControl method, walked from the service descriptor rather than
//! from a list in the test: a method added to the proto is covered without anyone adding it here.

mod common;

use common::node_process::LoggedNode;
use common::*;
use tonic::{Code, Status};

/// Waits until the node says `calls` calls hold a slot (each stream of a connection is served by
/// its own task, so the order they take slots in is not the order they were sent in).
async fn calls_in_progress(metrics: std::net::SocketAddr, calls: usize) {
    until_metric(metrics, "roomctl_calls_in_progress", calls as f64).await;
}

/// Every method of the descriptor, called while a call of its own holds the node's only call
/// slot: the second is shed at once (`UNAVAILABLE` / `OVERLOADED`), the first runs into the
/// node's request timeout (`DEADLINE_EXCEEDED`), each is counted in
/// `roomctl_rpcs_total{method,code}` and each leaves exactly one access line with its code. The
/// held call is one whose client sent its headers but never its message, which no method can
/// answer before its deadline.
#[tokio::test]
async fn every_method_is_shed_timed_counted_and_audited() {
    let node = LoggedNode::start(node_process::serve(&[
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--max-concurrent-calls",
        "1",
        "--request-timeout",
        "300ms",
    ]))
    .await;
    let methods = room_control_methods();
    assert!(methods.len() >= 11, "{methods:?}");
    let bearer = format!("Bearer {}", token("ops", "*", "service"));
    let mut h2 = bare::connect(node.addr).await;
    for method in &methods {
        let path = format!("/roomcontrol.v1.RoomControl/{method}");
        let headers = [("authorization", bearer.as_str())];
        // The held call: headers only, the message never follows.
        let (head, _) = bare::request(&path, &headers, &());
        let (held, mut held_body) = h2.send_request(head, false).unwrap();
        calls_in_progress(node.metrics.unwrap(), 1).await;
        let shed = bare::call(&mut h2, bare::request(&path, &headers, &())).await;
        let info = assert_error(&shed, Code::Unavailable, "OVERLOADED");
        assert_eq!(info["limit"], "max_concurrent_calls", "{method}");
        let held = tokio::time::timeout(PATIENCE, held).await.unwrap().unwrap();
        let status = Status::from_header_map(held.headers())
            .unwrap_or_else(|| panic!("{method}: the held call was answered {held:?}"));
        let info = assert_error(&status, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
        assert_eq!(info["timeout_ms"], "300", "{method}");
        held_body.send_reset(h2::Reason::CANCEL);
    }

    let text = scrape(node.metrics.unwrap()).await;
    for method in &methods {
        for code in ["UNAVAILABLE", "DEADLINE_EXCEEDED"] {
            let series = format!("roomctl_rpcs_total{{method=\"{method}\",code=\"{code}\"}}");
            assert_eq!(metric(&text, &series), 1.0, "{series} in\n{text}");
        }
    }

    let lines = node.stop().await;
    for method in &methods {
        let mut codes = access_codes(&lines, method);
        codes.sort();
        assert_eq!(
            codes,
            ["DEADLINE_EXCEEDED", "UNAVAILABLE"],
            "{method}: its access lines in\n{}",
            lines.join("\n")
        );
    }
}

/// Every method of the descriptor, called by clients that break their request off half-way
/// (a reset stream, then a closed connection) while the node reads it: each such call is
/// counted and logged `CANCELLED`, what it is, not `INTERNAL` or `UNKNOWN`, which operators
/// alert on.
#[tokio::test]
async fn calls_their_clients_break_off_are_cancelled() {
    let node = LoggedNode::with_metrics().await;
    let metrics = node.metrics.unwrap();
    let bearer = format!("Bearer {}", token("ops", "*", "service"));
    let methods = room_control_methods();
    for method in &methods {
        let path = format!("/roomcontrol.v1.RoomControl/{method}");
        for close_connection in [false, true] {
            let mut h2 = bare::connect(node.addr).await;
            let (head, _) = bare::request(&path, &[("authorization", bearer.as_str())], &());
            let (_answer, mut body) = h2.send_request(head, false).unwrap();
            // A frame that announces 100 bytes of message, and brings 3.
            body.send_data(vec![0, 0, 0, 0, 100, 1, 2, 3].into(), false)
                .unwrap();
            calls_in_progress(metrics, 1).await;
            if close_connection {
                drop((h2, body, _answer));
            } else {
                body.send_reset(h2::Reason::CANCEL);
            }
            calls_in_progress(metrics, 0).await;
        }
    }
    let text = scrape(metrics).await;
    for method in &methods {
        let series = format!("roomctl_rpcs_total{{method=\"{method}\",code=\"CANCELLED\"}}");
        assert_eq!(metric(&text, &series), 2.0, "{series} in\n{text}");
    }
    let lines = node.stop().await;
    for method in &methods {
        assert_eq!(
            access_codes(&lines, method),
            ["CANCELLED", "CANCELLED"],
            "{method}"
        );
    }
}
