//! Bearer-token authentication: HS256 JWTs with the claims `sub`, `room`, `role` and `exp`.
//!
//! [`Authenticator`] runs as a tonic interceptor in front of the RoomControl service: it verifies
//! the token once per call (HMAC, no I/O, so the synchronous interceptor is the right place) and
//! puts the verified [`Caller`] in the request's extensions, where handlers read it. Health and
//! reflection stay open, as load balancers and grpcurl expect.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::{service::Interceptor, Request, Status};

use crate::engine::{Caller, RoomScope, TokenRole};
use crate::error::Error;

/// The claims of a roomctl token; all four are required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The caller's identity.
    pub sub: String,
    /// The room the token is for, or `*` (service tokens only).
    pub room: String,
    /// `participant`, `moderator` or `service`.
    pub role: String,
    /// Expiry, in seconds since the Unix epoch.
    pub exp: u64,
}

impl Claims {
    /// Claims for `identity` in `room` as `role`, valid for `ttl` from now.
    pub fn new(identity: &str, room: &str, role: &str, ttl: Duration) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            sub: identity.to_owned(),
            room: room.to_owned(),
            role: role.to_owned(),
            exp: (now + ttl).as_secs(),
        }
    }

    /// Turns verified claims into a caller, rejecting combinations the contract forbids.
    fn into_caller(self) -> Result<Caller, Error> {
        let role = match self.role.as_str() {
            "participant" => TokenRole::Participant,
            "moderator" => TokenRole::Moderator,
            "service" => TokenRole::Service,
            other => {
                return Err(Error::Unauthenticated(format!(
                    "unknown role {other:?} in token; expected participant, moderator or service"
                )))
            }
        };
        if self.sub.is_empty() {
            return Err(Error::Unauthenticated("the token's sub is empty".into()));
        }
        let scope = match self.room.as_str() {
            "*" if role == TokenRole::Service => RoomScope::All,
            "*" => {
                return Err(Error::Unauthenticated(
                    "room \"*\" is for service tokens only".into(),
                ))
            }
            "" => return Err(Error::Unauthenticated("the token's room is empty".into())),
            room => RoomScope::One(room.to_owned()),
        };
        Ok(Caller {
            identity: self.sub,
            scope,
            role,
        })
    }
}

/// Signs tokens with the server's secret (`roomctl token`, `--dev`, tests).
///
/// ```
/// use std::time::Duration;
/// use roomctl::auth::{mint, Authenticator, Claims};
/// use roomctl::engine::TokenRole;
///
/// let token = mint(b"s3cret", &Claims::new("alice", "standup", "moderator", Duration::from_secs(60)));
/// let caller = Authenticator::new(b"s3cret").verify(&token).unwrap();
/// assert_eq!((caller.identity.as_str(), caller.role), ("alice", TokenRole::Moderator));
/// assert!(Authenticator::new(b"another secret").verify(&token).is_err());
/// ```
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing of plain claims cannot fail")
}

/// How many verified tokens are remembered. Callers reuse a token for many calls (a gateway, a
/// dashboard), so a hit skips base64, two JSON parses and the HMAC; a miss costs one verification.
const VERIFIED_TOKENS: usize = 16_384;

/// Verifies bearer tokens; cheap to clone (the key and the cache are shared).
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Verifier>,
}

struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// Tokens already verified, with their `exp`: keyed by the whole token, so a hit is the
    /// same signed bytes, and the expiry is checked again on every hit.
    verified: quick_cache::sync::Cache<String, (Caller, u64)>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Authenticator {
    /// An authenticator for tokens signed with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        // The algorithm is pinned: a token naming any other (none, HS384, RS256...) is refused.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        Self {
            inner: Arc::new(Verifier {
                key: DecodingKey::from_secret(secret),
                validation,
                verified: quick_cache::sync::Cache::new(VERIFIED_TOKENS),
            }),
        }
    }

    /// Verifies a raw token and returns the caller it names.
    pub fn verify(&self, token: &str) -> Result<Caller, Error> {
        let verifier = &*self.inner;
        // jsonwebtoken accepts a token while `exp >= now` (no leeway); so does the cache.
        if let Some((caller, exp)) = verifier.verified.get(token) {
            if exp >= now_secs() {
                return Ok(caller);
            }
        }
        let data = jsonwebtoken::decode::<Claims>(token, &verifier.key, &verifier.validation)
            .map_err(|err| {
                Error::Unauthenticated(match err.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired".to_owned(),
                    ErrorKind::InvalidSignature => "the token's signature is invalid".to_owned(),
                    ErrorKind::InvalidAlgorithm => "the token must be signed with HS256".to_owned(),
                    ErrorKind::MissingRequiredClaim(claim) => {
                        format!("the token lacks the {claim:?} claim")
                    }
                    _ => format!("malformed token: {err}"),
                })
            })?;
        let exp = data.claims.exp;
        let caller = data.claims.into_caller()?;
        verifier
            .verified
            .insert(token.to_owned(), (caller.clone(), exp));
        Ok(caller)
    }

    /// Reads `authorization: Bearer <token>` from request metadata and verifies it.
    pub fn authenticate(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Caller, Error> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| Error::Unauthenticated("missing authorization: Bearer <token>".into()))?
            .to_str()
            .map_err(|_| Error::Unauthenticated("authorization header is not text".into()))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                Error::Unauthenticated("authorization must be \"Bearer <token>\"".into())
            })?;
        self.verify(token.trim())
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.authenticate(request.metadata())?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The verified caller the [`Authenticator`] put in a request's extensions.
pub fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Error::Unauthenticated("no verified caller".into()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret";

    fn token(role: &str, room: &str, ttl_secs: i64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let claims = Claims {
            sub: "ann".into(),
            room: room.into(),
            role: role.into(),
            exp: (now + ttl_secs) as u64,
        };
        mint(SECRET, &claims)
    }

    fn unauthenticated(result: Result<Caller, Error>) -> String {
        match result {
            Err(Error::Unauthenticated(msg)) => msg,
            other => panic!("expected UNAUTHENTICATED, got {other:?}"),
        }
    }

    #[test]
    fn a_good_token_names_its_caller() {
        let auth = Authenticator::new(SECRET);
        let caller = auth.verify(&token("moderator", "r1", 60)).unwrap();
        assert_eq!(caller.identity, "ann");
        assert_eq!(caller.scope, RoomScope::One("r1".into()));
        assert_eq!(caller.role, TokenRole::Moderator);
        let service = auth.verify(&token("service", "*", 60)).unwrap();
        assert_eq!(service.scope, RoomScope::All);
    }

    #[test]
    fn bad_tokens_are_unauthenticated() {
        let auth = Authenticator::new(SECRET);
        assert!(unauthenticated(auth.verify(&token("moderator", "r", -10))).contains("expired"));
        assert!(unauthenticated(auth.verify(&token("participant", "*", 60))).contains("service"));
        assert!(unauthenticated(auth.verify(&token("admin", "r", 60))).contains("role"));
        let other = Authenticator::new(b"another secret");
        assert!(unauthenticated(other.verify(&token("moderator", "r", 60))).contains("signature"));
        unauthenticated(auth.verify("not.a.token"));
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let auth = Authenticator::new(SECRET);
        let token = mint(
            SECRET,
            &Claims::new("ann", "r", "moderator", Duration::from_secs(1)),
        );
        assert!(auth.verify(&token).is_ok());
        assert!(auth.verify(&token).is_ok(), "remembered");
        std::thread::sleep(Duration::from_millis(2100));
        assert!(unauthenticated(auth.verify(&token)).contains("expired"));
    }

    #[test]
    fn other_algorithms_are_refused() {
        let claims = Claims::new("ann", "r", "moderator", Duration::from_secs(60));
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        let msg = unauthenticated(Authenticator::new(SECRET).verify(&hs384));
        assert!(msg.contains("HS256"), "{msg}");
    }

    #[test]
    fn every_claim_is_required() {
        let auth = Authenticator::new(SECRET);
        let exp = Claims::new("a", "r", "moderator", Duration::from_secs(60)).exp;
        for claims in [
            serde_json::json!({"room": "r", "role": "moderator", "exp": exp}),
            serde_json::json!({"sub": "a", "role": "moderator", "exp": exp}),
            serde_json::json!({"sub": "a", "room": "r", "exp": exp}),
            serde_json::json!({"sub": "a", "room": "r", "role": "moderator"}),
        ] {
            let token = jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET),
            )
            .unwrap();
            unauthenticated(auth.verify(&token));
        }
    }
}
