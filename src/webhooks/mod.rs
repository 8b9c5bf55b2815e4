//! Webhooks: room events pushed to HTTP endpoints, signed as Standard Webhooks 1.0 writes it,
//! in `seq` order per room and endpoint, at least once.
//!
//! Delivery is a cursor on each room's log, kept by the store beside the room ([`Outbox`]): an
//! endpoint that is down, slow or failing is retried with capped, jittered backoff for as long
//! as the log holds its events, and when the history moves past its cursor it is told exactly
//! what it lost (an `events_lost` notice) before delivery goes on. Each endpoint has a
//! deliverer of its own ([`deliver`]), so one endpoint never delays another, and within it a
//! failing room waits apart, so it never delays another room.
//!
//! This module holds the endpoints' settings ([`Endpoint`]), the signatures ([`sign`]) and the
//! delivery; the store persists positions, the server starts the deliverers.

mod deliver;
pub mod sign;

pub use deliver::start;

use std::collections::BTreeSet;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::codec::descriptors;
use crate::pb;
use crate::pb::event::Payload;
use crate::store::OutboxEndpoint;
use sign::Secret;

/// What a webhook endpoint gets, and how it is reached.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// How logs, metrics and the store know it: its URL without query or credentials, or the
    /// name it was given.
    name: String,
    url: http::Uri,
    /// The current secret first; the others sign too while receivers move to it.
    secrets: Vec<Secret>,
    /// The `Event.payload` field numbers it wants; None: every event.
    events: Option<BTreeSet<u32>>,
    /// The longest a request may take, from connecting to the end of the answer's head.
    timeout: Duration,
    /// The cap of the doubling delay between a room's retries.
    max_retry_delay: Duration,
    /// Certificate authorities trusted for https besides the Mozilla roots.
    ca: Vec<CertificateDer<'static>>,
}

/// Default of an endpoint's `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of an endpoint's `max_retry_delay`.
pub const DEFAULT_MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// The first retry's delay (the cap is at least this).
const MIN_RETRY_DELAY: Duration = Duration::from_millis(100);

impl Endpoint {
    /// An endpoint at `url` (http or https), signing with each of `secrets` (at least one; the
    /// first is the current one), receiving the events named in `events` (as in
    /// `Event.payload`: `user_disconnected`, `ack_drop_user`...; None: all).
    pub fn new(url: &str, secrets: Vec<Secret>, events: Option<&[String]>) -> Result<Self, String> {
        let shown = shown(url);
        let parsed = url::Url::parse(url)
            .map_err(|err| format!("webhook url `{shown}` is invalid: {err}"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(format!(
                "webhook url `{shown}` must be an http:// or https:// URL with a host"
            ));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(format!(
                "webhook url `{shown}` carries a user or password, which would not be sent: \
                 receivers authenticate roomctl by the signature"
            ));
        }
        if secrets.is_empty() {
            return Err(format!("webhook `{shown}` needs a secret"));
        }
        let events = match events {
            None => None,
            Some([]) => {
                return Err(format!(
                    "webhook `{shown}` lists no events: leave `events` out to send them all"
                ))
            }
            Some(names) => Some(payload_numbers(names)?),
        };
        let url = url
            .parse()
            .map_err(|err| format!("webhook url `{shown}` is invalid: {err}"))?;
        Ok(Self {
            name: shown,
            url,
            secrets,
            events,
            timeout: DEFAULT_TIMEOUT,
            max_retry_delay: DEFAULT_MAX_RETRY_DELAY,
            ca: Vec::new(),
        })
    }

    /// The endpoint trusting, for https, the certificate authorities of the PEM file at `path`
    /// too (a private CA's).
    pub fn trusting(self, path: &std::path::Path) -> Result<Self, String> {
        let shown = path.display();
        let ca = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|err| format!("cannot read the CA file {shown}: {err}"))?;
        if ca.is_empty() {
            return Err(format!("the CA file {shown} holds no certificate"));
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in &ca {
            roots
                .add(cert.clone())
                .map_err(|err| format!("the CA file {shown}: {err}"))?;
        }
        Ok(Self { ca, ..self })
    }

    /// The endpoint known as `name` (in logs, metrics and the store) rather than by its URL: a
    /// name kept when the URL changes keeps the endpoint's cursors.
    pub fn named(self, name: &str) -> Result<Self, String> {
        if name.trim().is_empty() {
            return Err("a webhook's name may not be empty".into());
        }
        Ok(Self {
            name: name.to_owned(),
            ..self
        })
    }

    /// The endpoint with requests cut after `timeout` (at least 100ms) and retries at most
    /// `max_retry_delay` apart (at least 100ms).
    pub fn with_timing(self, timeout: Duration, max_retry_delay: Duration) -> Result<Self, String> {
        if timeout < MIN_RETRY_DELAY || max_retry_delay < MIN_RETRY_DELAY {
            return Err("a webhook's timeout and max_retry_delay are at least 100ms".into());
        }
        Ok(Self {
            timeout,
            max_retry_delay,
            ..self
        })
    }

    /// How logs and metrics name the endpoint.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The endpoint as the store keeps it: its name, and how long a room's turn may go without
    /// news (a request's timeout, twice, and 5 s for the store): past it another node may take
    /// the room.
    pub fn in_store(&self) -> OutboxEndpoint {
        OutboxEndpoint {
            name: self.name.clone(),
            turn: self.timeout * 2 + Duration::from_secs(5),
        }
    }

    /// Whether the endpoint wants `event`.
    fn wants(&self, event: &pb::Event) -> bool {
        match (&self.events, &event.payload) {
            (None, _) => true,
            (Some(numbers), Some(payload)) => numbers.contains(&payload_number(payload)),
            (Some(_), None) => false,
        }
    }
}

/// `url` as logs, metrics and messages show it: without its query, fragment or credentials,
/// which may hold secrets (as it was written when it does not parse).
pub fn shown(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            parsed.set_query(None);
            parsed.set_fragment(None);
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Err(_) => url.to_owned(),
    }
}

/// The names an endpoint's `events` may list: the fields of the proto's `Event.payload`, read
/// from its descriptor, so a new event can be chosen as soon as it exists.
pub fn event_names() -> Vec<String> {
    payload_fields()
        .map(|field| field.name().to_owned())
        .collect()
}

fn payload_fields() -> impl Iterator<Item = prost_reflect::FieldDescriptor> {
    descriptors()
        .get_message_by_name("roomcontrol.v1.Event")
        .and_then(|event| event.oneofs().find(|oneof| oneof.name() == "payload"))
        .map(|payload| payload.fields().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
}

/// The field numbers of the `Event.payload` fields `names`, or an error naming the unknown ones
/// and the known.
fn payload_numbers(names: &[String]) -> Result<BTreeSet<u32>, String> {
    let mut numbers = BTreeSet::new();
    let mut unknown = Vec::new();
    for name in names {
        match payload_fields().find(|field| field.name() == name) {
            Some(field) => {
                numbers.insert(field.number());
            }
            None => unknown.push(format!("`{name}`")),
        }
    }
    if !unknown.is_empty() {
        return Err(format!(
            "unknown webhook event {}; the events are {}",
            unknown.join(", "),
            event_names().join(", ")
        ));
    }
    Ok(numbers)
}

/// The field number of `payload` in `Event`: the key its own encoding starts with.
fn payload_number(payload: &Payload) -> u32 {
    let mut encoded = Vec::with_capacity(payload.encoded_len());
    payload.encode(&mut encoded);
    prost::encoding::decode_key(&mut encoded.as_slice()).map_or(0, |(number, _)| number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Vec<Secret> {
        vec![Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()]
    }

    #[test]
    fn every_payload_of_the_proto_can_be_chosen_by_its_name() {
        let names = event_names();
        assert!(names.contains(&"ack_drop_user".to_owned()), "{names:?}");
        for name in &names {
            let numbers = payload_numbers(std::slice::from_ref(name)).unwrap();
            assert_eq!(numbers.len(), 1);
        }
        // Each payload's number, read from its encoding, is the one its name gives.
        let drop = Payload::AckDropUser(pb::AckDropUser::default());
        let wanted = payload_numbers(&["ack_drop_user".to_owned()]).unwrap();
        assert!(wanted.contains(&payload_number(&drop)));
    }

    #[test]
    fn an_endpoint_receives_the_events_it_names() {
        let names = ["user_disconnected".to_owned()];
        let endpoint = Endpoint::new("http://127.0.0.1:9/hook", secret(), Some(&names)).unwrap();
        let event = |payload| pb::Event {
            payload: Some(payload),
            ..Default::default()
        };
        assert!(endpoint.wants(&event(Payload::UserDisconnected(Default::default()))));
        assert!(!endpoint.wants(&event(Payload::UserConnected(Default::default()))));
        let all = Endpoint::new("http://127.0.0.1:9/hook", secret(), None).unwrap();
        assert!(all.wants(&event(Payload::UserConnected(Default::default()))));
    }

    #[test]
    fn bad_settings_are_named() {
        let err = Endpoint::new("ftp://host/x", secret(), None).unwrap_err();
        assert!(err.contains("http:// or https://"), "{err}");
        let err = Endpoint::new("not a url", secret(), None).unwrap_err();
        assert!(err.contains("invalid"), "{err}");
        let err = Endpoint::new("http://h/x", vec![], None).unwrap_err();
        assert!(err.contains("needs a secret"), "{err}");
        let err = Endpoint::new("http://h/x", secret(), Some(&["nope".to_owned()])).unwrap_err();
        assert!(
            err.contains("`nope`") && err.contains("user_connected"),
            "{err}"
        );
    }

    #[test]
    fn an_endpoint_is_named_without_its_query() {
        let endpoint = Endpoint::new("https://example.com/hook?token=x", secret(), None).unwrap();
        assert_eq!(endpoint.name(), "https://example.com/hook");
        assert_eq!(endpoint.named("billing").unwrap().name(), "billing");
        assert_eq!(
            shown("https://u:p@example.com/h?t=1#f"),
            "https://example.com/h"
        );
    }

    #[test]
    fn credentials_in_a_url_and_an_empty_choice_of_events_are_refused() {
        let err = Endpoint::new("https://user:pw@example.com/hook", secret(), None).unwrap_err();
        assert!(
            err.contains("user or password") && !err.contains("pw"),
            "{err}"
        );
        let err = Endpoint::new("http://h/x", secret(), Some(&[])).unwrap_err();
        assert!(err.contains("lists no events"), "{err}");
    }
}
