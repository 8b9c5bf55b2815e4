//! TLS and mutual TLS on the gRPC listener, with certificates made in the test: RoomControl,
//! health and streams work over TLS; with a client CA, a client without a certificate of that
//! CA cannot call; certificates are re-read (as on SIGHUP) for new connections while open
//! streams go on.

mod common;

use std::net::SocketAddr;

use common::certs::{Ca, Dir};
use common::*;
use roomctl::pb;
use roomctl::tls::TlsFiles;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// A channel to `addr` over TLS trusting `ca`, presenting `identity` (cert, key) if given.
async fn tls_channel(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// Whether a RoomControl call on `channel` is served.
async fn served(channel: Result<Channel, tonic::transport::Error>) -> bool {
    let Ok(channel) = channel else { return false };
    let mut client = roomctl::client::with_token(channel, &token("ops", "r", "service")).unwrap();
    client
        .join(pb::JoinRequest {
            room_id: "r".into(),
            ..Default::default()
        })
        .await
        .is_ok()
}

/// The server's certificate files, signed by `ca`, in `dir`.
fn server_files(dir: &Dir, ca: &Ca, client_ca: Option<&Ca>) -> TlsFiles {
    let (cert, key) = ca.issue(&["localhost", "127.0.0.1"]);
    TlsFiles {
        cert: dir.write("server.crt", &cert),
        key: dir.write("server.key", &key),
        client_ca: client_ca.map(|ca| dir.write("clients.crt", &ca.pem())),
    }
}

/// Over TLS, RoomControl calls, Events streams and health all work; a plaintext client is not
/// served.
#[tokio::test]
async fn roomcontrol_and_health_over_tls() {
    let (dir, ca) = (Dir::new("tls"), Ca::new());
    let files = server_files(&dir, &ca, None);
    let server = TestServer::start_with(Backend::Memory, |c| c.tls = Some(files.clone())).await;
    let channel = tls_channel(server.addr, &ca.pem(), None).await.unwrap();
    let mut ops =
        roomctl::client::with_token(channel.clone(), &token("ops", "r", "service")).unwrap();
    let bob = join(&mut ops, "r", "Bob").await;
    let mut stream = subscribe(&mut ops, "r", &bob.client_id, Some(bob.seq))
        .await
        .unwrap();
    ops.drop_user(drop_request("r", &[&bob.client_id], "tls"))
        .await
        .unwrap();
    assert_eq!(kind(&next_event(&mut stream).await), "room_disconnected");
    let mut health = HealthClient::new(channel);
    health.check(HealthCheckRequest::default()).await.unwrap();

    let plaintext = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    assert!(!served(plaintext).await, "a plaintext client is served");
}

/// With a client CA, only clients presenting a certificate of that CA are served: none, or one
/// from another CA, is refused.
#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_of_its_ca() {
    let (dir, ca, clients, rogue) = (Dir::new("mtls"), Ca::new(), Ca::new(), Ca::new());
    let files = server_files(&dir, &ca, Some(&clients));
    let server = TestServer::start_with(Backend::Memory, |c| c.tls = Some(files.clone())).await;
    let good = clients.issue(&["gateway"]);
    let bad = rogue.issue(&["gateway"]);
    assert!(served(tls_channel(server.addr, &ca.pem(), Some(&good)).await).await);
    assert!(!served(tls_channel(server.addr, &ca.pem(), None).await).await);
    assert!(!served(tls_channel(server.addr, &ca.pem(), Some(&bad)).await).await);
}

/// New certificate files are read on reload (what SIGHUP does): new connections get the new
/// certificate (a client trusting only the old CA is refused), and a stream opened before the
/// reload goes on receiving events.
#[tokio::test]
async fn certificates_reload_without_dropping_open_streams() {
    let (dir, old_ca, new_ca) = (Dir::new("tls-reload"), Ca::new(), Ca::new());
    let files = server_files(&dir, &old_ca, None);
    let server = TestServer::start_with(Backend::Memory, |c| c.tls = Some(files.clone())).await;
    let before = tls_channel(server.addr, &old_ca.pem(), None).await.unwrap();
    let mut ops = roomctl::client::with_token(before, &token("ops", "r", "service")).unwrap();
    let first = join(&mut ops, "r", "x").await;
    let mut stream = subscribe(&mut ops, "r", "", Some(first.seq)).await.unwrap();

    server_files(&dir, &new_ca, None);
    assert!(
        server.nodes[0].reloader.tls().unwrap(),
        "the server has TLS to reload"
    );
    assert!(!served(tls_channel(server.addr, &old_ca.pem(), None).await).await);
    assert!(served(tls_channel(server.addr, &new_ca.pem(), None).await).await);
    let later = next_event(&mut stream).await;
    assert_eq!(
        later.seq,
        first.seq + 1,
        "the open stream saw the join made after the reload"
    );
}
