//! Who calls: the verified caller of an RPC as its token describes it, and the permissions that
//! depend only on the caller and the room named (who may drop, lock, subscribe, list rooms). Pure;
//! may depend on errors and the generated types only.

use crate::error::{Error, LOCK_UNAUTHORIZED_CODE, UNAUTHORIZED_ACCESS_CODE};
use crate::pb::Role;

/// The role a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRole {
    /// An end-user in one room.
    Participant,
    /// A moderator of one room.
    Moderator,
    /// A trusted internal service, for one room or all (`*`).
    Service,
}

/// Which rooms a token is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomScope {
    /// Exactly this room.
    One(String),
    /// Every room (`room: "*"`, service tokens only).
    All,
}

/// The verified caller of an RPC, as its token describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's `sub`.
    pub identity: String,
    /// The token's `room`.
    pub scope: RoomScope,
    /// The token's `role`.
    pub role: TokenRole,
}

impl Caller {
    /// The role and identity a join asking for `role` as `identity` gets (Unspecified, empty:
    /// whatever is the caller's own): services choose both, others may only repeat their own.
    pub fn join_grant(&self, role: Role, identity: &str) -> Result<(Role, String), Error> {
        let own_role = match self.role {
            TokenRole::Participant => Role::Participant,
            TokenRole::Moderator => Role::Moderator,
            TokenRole::Service => {
                let role = match role {
                    Role::Unspecified => Role::Participant,
                    role => role,
                };
                let identity = if identity.is_empty() {
                    self.identity.clone()
                } else {
                    identity.to_owned()
                };
                return Ok((role, identity));
            }
        };
        if role != Role::Unspecified && role != own_role {
            return Err(Error::Forbidden(format!(
                "a {} token cannot join as {}; only service tokens choose the role",
                own_role.as_str_name(),
                role.as_str_name()
            )));
        }
        if !identity.is_empty() && identity != self.identity {
            return Err(Error::Forbidden(
                "only service tokens join on behalf of another identity".into(),
            ));
        }
        Ok((own_role, self.identity.clone()))
    }

    /// roomctl itself, for what no one calls: removing clients whose presence ran out.
    pub fn system() -> Self {
        Self {
            identity: "roomctl".into(),
            scope: RoomScope::All,
            role: TokenRole::Service,
        }
    }

    /// Whether this caller is a trusted service.
    pub fn is_service(&self) -> bool {
        self.role == TokenRole::Service
    }

    /// Any token for `room_id` may act in it; service tokens for `*` act everywhere.
    pub fn check_room(&self, room_id: &str) -> Result<(), Error> {
        match &self.scope {
            RoomScope::All => Ok(()),
            RoomScope::One(room) if room == room_id => Ok(()),
            RoomScope::One(room) => Err(Error::Forbidden(format!(
                "the token is for room {room:?}, not {room_id:?}"
            ))),
        }
    }

    /// Moderators of the room and services may drop; a participant gets the vendor's 5116.
    pub fn check_may_drop(&self, room_id: &str) -> Result<(), Error> {
        self.check_moderator(room_id, UNAUTHORIZED_ACCESS_CODE, "drop users")
    }

    /// Moderators of the room and services may end its session; a participant gets the
    /// vendor's 5116.
    pub fn check_may_end_session(&self, room_id: &str) -> Result<(), Error> {
        self.check_moderator(room_id, UNAUTHORIZED_ACCESS_CODE, "end sessions")
    }

    /// Moderators of the room and services may list and lift bans; a participant gets the
    /// vendor's 5116.
    pub fn check_may_manage_bans(&self, room_id: &str) -> Result<(), Error> {
        self.check_moderator(room_id, UNAUTHORIZED_ACCESS_CODE, "list or lift bans")
    }

    /// Moderators of the room and services may lock and unlock it; a participant gets the
    /// vendor's 5115.
    pub fn check_may_lock(&self, room_id: &str) -> Result<(), Error> {
        self.check_moderator(room_id, LOCK_UNAUTHORIZED_CODE, "lock or unlock rooms")
    }

    fn check_moderator(&self, room_id: &str, code: &'static str, what: &str) -> Result<(), Error> {
        self.check_room(room_id)?;
        if self.role == TokenRole::Participant {
            return Err(Error::UnauthorizedAccess {
                code,
                detail: format!(
                    "participants may not {what}; a moderator or service token is needed"
                ),
            });
        }
        Ok(())
    }

    /// Who may subscribe how: participants only as their own clients, never as observers.
    pub fn check_may_subscribe(&self, room_id: &str, client_id: Option<&str>) -> Result<(), Error> {
        self.check_room(room_id)?;
        if client_id.is_none() && self.role == TokenRole::Participant {
            return Err(Error::Forbidden(
                "participants subscribe as one of their clients; observing needs a moderator or \
                 service token"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Only service tokens for every room may list rooms.
    pub fn check_may_list_rooms(&self) -> Result<(), Error> {
        if self.is_service() && self.scope == RoomScope::All {
            return Ok(());
        }
        Err(Error::Forbidden(
            "listing rooms needs a service token for every room (room \"*\")".into(),
        ))
    }

    /// Whether this caller may act as a client owned by `owner`.
    pub(crate) fn may_act_for(&self, owner: &str) -> bool {
        self.is_service() || self.identity == owner
    }
}
