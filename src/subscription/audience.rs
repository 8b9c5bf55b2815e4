//! Who a subscription delivers to, which decides what it sees and when it ends: the contract's
//! table of events and their audiences, in one place. Pure; depends on the engine's caller and
//! client status, the errors and the generated types only.

use crate::engine::{Caller, ClientStatus};
use crate::error::Error;
use crate::pb::{self, event::Payload};

/// Who a subscription delivers to, which decides what it sees and when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience {
    client_id: Option<String>,
    identity: String,
    service_observer: bool,
}

impl Audience {
    /// Admits `caller` as a subscriber of `client_id` (None: an observer) starting after `start`,
    /// given the client's status. A departed client may still replay up to its departure.
    pub fn admit(
        caller: &Caller,
        client_id: Option<&str>,
        status: ClientStatus,
        start: u64,
    ) -> Result<Self, Error> {
        let Some(client_id) = client_id else {
            return Ok(Self {
                client_id: None,
                identity: caller.identity.clone(),
                service_observer: caller.is_service(),
            });
        };
        let not_found = || Error::ClientNotFound {
            client_id: client_id.to_owned(),
        };
        let owner = match status {
            ClientStatus::Present { identity } => identity,
            ClientStatus::Departed { identity, end_seq } if start < end_seq => identity,
            ClientStatus::Departed { .. } | ClientStatus::Unknown => return Err(not_found()),
        };
        if !caller.may_act_for(&owner) {
            return Err(Error::Forbidden(
                "you may only subscribe as your own clients".into(),
            ));
        }
        Ok(Self {
            client_id: Some(client_id.to_owned()),
            identity: caller.identity.clone(),
            service_observer: false,
        })
    }

    fn is_own(&self, client_id: &str) -> bool {
        self.client_id.as_deref() == Some(client_id)
    }

    /// Whether this subscription delivers `event`.
    pub fn sees(&self, event: &pb::Event) -> bool {
        match &event.payload {
            Some(Payload::UserConnected(_)) | Some(Payload::UserDisconnected(_)) => true,
            Some(Payload::RoomDisconnected(rd)) => {
                self.service_observer || self.is_own(&rd.client_id)
            }
            Some(Payload::AckDropUser(ack)) => {
                self.service_observer || self.identity == ack.moderator
            }
            Some(Payload::RoomLocked(_))
            | Some(Payload::RoomUnlocked(_))
            | Some(Payload::SessionDestroyed(_))
            | Some(Payload::UserBanned(_))
            | Some(Payload::UserUnbanned(_)) => true,
            None => false,
        }
    }

    /// Whether the subscription ends (OK) right after delivering `event`: its client was
    /// dropped, left or timed out, or the session ended (which ends every stream).
    pub fn ends_after(&self, event: &pb::Event) -> bool {
        match &event.payload {
            Some(Payload::RoomDisconnected(rd)) => self.is_own(&rd.client_id),
            Some(Payload::UserDisconnected(ud)) => self.is_own(&ud.client_id),
            Some(Payload::SessionDestroyed(_)) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{RoomScope, TokenRole};
    use crate::pb::{DisconnectReason, DropOutcome};

    fn caller(identity: &str, role: TokenRole) -> Caller {
        Caller {
            identity: identity.into(),
            scope: RoomScope::One("r".into()),
            role,
        }
    }

    fn event(seq: u64, payload: Payload) -> pb::Event {
        pb::Event {
            seq,
            payload: Some(payload),
            ..Default::default()
        }
    }

    #[test]
    fn audiences_see_what_the_contract_says() {
        // Alice drops bob's client a, while bob's client b and observers watch.
        let told = event(
            3,
            Payload::RoomDisconnected(pb::RoomDisconnected {
                client_id: "a".into(),
                reason: DisconnectReason::DroppedByModerator as i32,
                message: String::new(),
            }),
        );
        let gone = event(
            4,
            Payload::UserDisconnected(pb::UserDisconnected {
                client_id: "a".into(),
                reason: DisconnectReason::DroppedByModerator as i32,
            }),
        );
        let ack = event(
            5,
            Payload::AckDropUser(pb::AckDropUser {
                request_id: "q".into(),
                moderator: "alice".into(),
                results: vec![pb::DropResult {
                    client_id: "a".into(),
                    outcome: DropOutcome::Dropped as i32,
                }],
            }),
        );
        let bob = caller("bob", TokenRole::Participant);
        let present = || ClientStatus::Present {
            identity: "bob".into(),
        };
        let dropped = Audience::admit(&bob, Some("a"), present(), 2).unwrap();
        assert!(dropped.sees(&told) && dropped.ends_after(&told));
        let other = Audience::admit(&bob, Some("b"), present(), 2).unwrap();
        assert!(
            !other.sees(&told)
                && other.sees(&gone)
                && !other.ends_after(&gone)
                && !other.sees(&ack)
        );
        let alice = caller("alice", TokenRole::Moderator);
        let moderator = Audience::admit(&alice, None, ClientStatus::Unknown, 2).unwrap();
        assert!(!moderator.sees(&told) && moderator.sees(&gone) && moderator.sees(&ack));
        let service = caller("s", TokenRole::Service);
        let service = Audience::admit(&service, None, ClientStatus::Unknown, 2).unwrap();
        assert!(service.sees(&told) && service.sees(&gone) && service.sees(&ack));
    }

    #[test]
    fn a_departed_client_is_admitted_only_with_a_cursor_before_its_departure() {
        let bob = caller("bob", TokenRole::Participant);
        let departed = || ClientStatus::Departed {
            identity: "bob".into(),
            end_seq: 5,
        };
        assert!(Audience::admit(&bob, Some("a"), departed(), 4).is_ok());
        assert!(matches!(
            Audience::admit(&bob, Some("a"), departed(), 5),
            Err(Error::ClientNotFound { .. })
        ));
        assert!(matches!(
            Audience::admit(&bob, Some("a"), ClientStatus::Unknown, 0),
            Err(Error::ClientNotFound { .. })
        ));
        let eve = caller("eve", TokenRole::Participant);
        assert!(matches!(
            Audience::admit(&eve, Some("a"), departed(), 4),
            Err(Error::Forbidden(_))
        ));
        assert!(
            Audience::admit(&caller("s", TokenRole::Service), Some("a"), departed(), 4).is_ok()
        );
    }
}
