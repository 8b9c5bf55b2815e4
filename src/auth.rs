//! Bearer-token authentication: HS256 JWTs with the claims `sub`, `room`, `role` and `exp`.
//!
//! [`Authenticator`] runs as a tonic interceptor in front of the RoomControl service: it verifies
//! the token once per call (HMAC, no I/O, so the synchronous interceptor is the right place) and
//! puts the verified [`Caller`] and the token's expiry in the request's extensions, where handlers
//! read them. Health and reflection stay open, as load balancers and grpcurl expect.
//!
//! The rules are strict and exact: HS256 only; `exp` and `nbf` are NumericDates (RFC 7519: whole
//! or fractional seconds), `exp` in the past from its very instant on (no leeway, no rounding), an
//! `nbf` in the future refused; a header naming critical extensions (`crit`) is refused, since
//! none is understood (RFC 7515); `iss` and `aud` are checked when the server is configured with
//! them; identities and rooms follow the contract's limits; tokens over [`MAX_TOKEN_BYTES`] are
//! refused unread; a call carries one `authorization` header, whose scheme `Bearer` is matched
//! without regard to case (RFC 7235). Refusals say what is wrong in plain words and never quote
//! the JWT parser.
//!
//! It turns a token into a [`Caller`] and nothing more: what a caller may do in a room is the
//! engine's rule, and it holds no room state and touches no store. It depends on the engine's
//! caller types, the errors and the id rules only.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::{service::Interceptor, Request, Status};

use crate::clock::Clock;
use crate::engine::{Caller, RoomScope, TokenRole};
use crate::error::Error;
use crate::ids;

/// Shortest secret `serve` accepts: HS256 needs 256 bits of key.
pub const MIN_SECRET_BYTES: usize = 32;

/// Longest token verified. Real tokens are a few hundred bytes; anything much larger is a
/// mistake or an attack, refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Checks that `secret` is long enough to sign with, saying how to make one if it is not.
pub fn check_secret(secret: &[u8]) -> Result<(), String> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "the JWT secret is {} bytes; HS256 needs at least {MIN_SECRET_BYTES} (256 bits). \
             Make one with: head -c 32 /dev/urandom | base64",
            secret.len()
        ));
    }
    Ok(())
}

/// Longest key id, in characters.
pub const MAX_KID_CHARS: usize = 64;

/// The HS256 secrets a server verifies with: one bare secret, or several named by key id
/// (`kid`), the first being the default. Several keys at once are how a secret is rotated: add
/// the new key, reload, switch the issuers to it, remove the old key, reload.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySet {
    /// `(kid, secret)`; a bare secret is the only entry and has no kid.
    keys: Vec<(Option<String>, Vec<u8>)>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KeySet {{ kids: {:?}, secrets: <redacted> }}",
            self.kids()
        )
    }
}

fn is_kid(kid: &str) -> bool {
    (1..=MAX_KID_CHARS).contains(&kid.len())
        && kid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A `kid=secret` line: the kid is everything before the first `=`.
fn keyed_line(line: &str) -> Option<(String, Vec<u8>)> {
    let (kid, secret) = line.split_once('=')?;
    (is_kid(kid) && secret.len() >= MIN_SECRET_BYTES)
        .then(|| (kid.to_owned(), secret.as_bytes().to_vec()))
}

impl KeySet {
    /// One bare secret, used for tokens without a `kid`.
    pub fn single(secret: impl Into<Vec<u8>>) -> Self {
        Self {
            keys: vec![(None, secret.into())],
        }
    }

    /// Reads the `--jwt-secret-file` format: `kid=secret` lines (blank lines ignored), or a
    /// single line that is not of that form, which is one bare secret (base64 padding `=`
    /// included). Every secret must be at least [`MIN_SECRET_BYTES`].
    pub fn parse(text: &str) -> Result<Self, String> {
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let keys = match lines.as_slice() {
            [] => return Err("the JWT secret is empty".into()),
            [line] => match keyed_line(line) {
                Some((kid, secret)) => vec![(Some(kid), secret)],
                None => vec![(None, line.as_bytes().to_vec())],
            },
            lines => {
                let mut keys: Vec<(Option<String>, Vec<u8>)> = Vec::new();
                for (n, line) in lines.iter().enumerate() {
                    let (kid, secret) = keyed_line(line).ok_or_else(|| {
                        format!(
                            "line {}: expected kid=secret, the kid 1..{MAX_KID_CHARS} characters \
                             of A-Za-z0-9._- and the secret at least {MIN_SECRET_BYTES} bytes",
                            n + 1
                        )
                    })?;
                    if keys.iter().any(|(k, _)| k.as_deref() == Some(kid.as_str())) {
                        return Err(format!("line {}: the kid {kid:?} appears twice", n + 1));
                    }
                    keys.push((Some(kid), secret));
                }
                keys
            }
        };
        let set = Self { keys };
        set.check()?;
        Ok(set)
    }

    /// Checks every secret's length.
    pub fn check(&self) -> Result<(), String> {
        self.keys
            .iter()
            .try_for_each(|(_, secret)| check_secret(secret))
    }

    /// The secrets, in order (the default one first).
    pub fn secrets(&self) -> impl Iterator<Item = &[u8]> {
        self.keys.iter().map(|(_, secret)| secret.as_slice())
    }

    /// The key ids, in order (empty for a bare secret).
    pub fn kids(&self) -> Vec<&str> {
        self.keys
            .iter()
            .filter_map(|(kid, _)| kid.as_deref())
            .collect()
    }

    /// The secret `kid` names (None: the default, first one, for tokens without a kid).
    fn secret(&self, kid: Option<&str>) -> Result<&[u8], String> {
        match kid {
            None => Ok(&self.keys[0].1),
            Some(kid) => self
                .keys
                .iter()
                .find(|(k, _)| k.as_deref() == Some(kid))
                .map(|(_, secret)| secret.as_slice())
                .ok_or_else(|| format!("no key with kid {kid:?}; the keys are {:?}", self.kids())),
        }
    }
}

/// The claims a token is minted with. `sub`, `room`, `role` and `exp` are required; `nbf`,
/// `iss` and `aud` are optional (`iss` and `aud` are required by a server configured with them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The caller's identity.
    pub sub: String,
    /// The room the token is for, or `*` (service tokens only).
    pub room: String,
    /// `participant`, `moderator` or `service`.
    pub role: String,
    /// Expiry, in seconds since the Unix epoch: the token is refused from that second on.
    pub exp: u64,
    /// Not valid before this time, in seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// The issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// The audience (the roomctl deployment the token is for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
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
            exp: now.saturating_add(ttl).as_secs(),
            nbf: None,
            iss: None,
            aud: None,
        }
    }
}

/// The claims verification decodes from a token whose signature held (`aud` may be a string or
/// a list, so it is left to jsonwebtoken's own check); [`Claims`] is what minting writes. `exp`
/// and `nbf` are NumericDates, which may have a fraction.
#[derive(Deserialize)]
struct DecodedClaims {
    sub: String,
    room: String,
    role: String,
    exp: f64,
    #[serde(default)]
    nbf: Option<f64>,
}

/// A NumericDate (seconds since the Unix epoch, maybe fractional) as an instant; None when it is
/// not a time (negative, infinite, NaN, beyond what a `SystemTime` holds).
fn numeric_date(seconds: f64) -> Option<SystemTime> {
    let since = Duration::try_from_secs_f64(seconds).ok()?;
    UNIX_EPOCH.checked_add(since)
}

impl DecodedClaims {
    /// Turns verified claims into a caller, rejecting combinations the contract forbids.
    fn into_caller(self) -> Result<Caller, Error> {
        let role = match self.role.as_str() {
            "participant" => TokenRole::Participant,
            "moderator" => TokenRole::Moderator,
            "service" => TokenRole::Service,
            _ => {
                return Err(Error::Unauthenticated(
                    "the token's role must be participant, moderator or service".into(),
                ))
            }
        };
        if self.sub.is_empty() {
            return Err(Error::Unauthenticated("the token's sub is empty".into()));
        }
        if self.sub.chars().count() > ids::MAX_ID_CHARS {
            return Err(Error::Unauthenticated(format!(
                "the token's sub is longer than {} characters",
                ids::MAX_ID_CHARS
            )));
        }
        let scope = match self.room.as_str() {
            "*" if role == TokenRole::Service => RoomScope::All,
            "*" => {
                return Err(Error::Unauthenticated(
                    "room \"*\" is for service tokens only".into(),
                ))
            }
            room if ids::is_room_id(room) => RoomScope::One(room.to_owned()),
            _ => {
                return Err(Error::Unauthenticated(
                    "the token's room is not a room id (1..128 characters of A-Za-z0-9._:-)".into(),
                ))
            }
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
/// let secret = b"0123456789abcdef0123456789abcdef";
/// let token = mint(secret, &Claims::new("alice", "standup", "moderator", Duration::from_secs(60)));
/// let caller = Authenticator::new(secret).verify(&token).unwrap().caller;
/// assert_eq!((caller.identity.as_str(), caller.role), ("alice", TokenRole::Moderator));
/// assert!(Authenticator::new(b"another secret, also 32 bytes long").verify(&token).is_err());
/// ```
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    sign(secret, None, claims)
}

/// Signs `claims` with the key `kid` names in `keys`, putting the kid in the header (None: the
/// default key, and no kid).
pub fn mint_with(keys: &KeySet, kid: Option<&str>, claims: &Claims) -> Result<String, String> {
    Ok(sign(keys.secret(kid)?, kid, claims))
}

fn sign(secret: &[u8], kid: Option<&str>, claims: &Claims) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret))
        .expect("HS256 signing of plain claims cannot fail")
}

/// What a server requires of tokens beyond the signature (`serve --jwt-issuer/--jwt-audience`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenRules {
    /// When set, tokens must carry exactly this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud` (alone or in a list).
    pub audience: Option<String>,
}

/// A verified token: who calls, and until when the token holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The caller the claims name.
    pub caller: Caller,
    /// The instant the token stops being valid (its `exp`).
    pub expires_at: SystemTime,
    /// The instant it starts being valid (its `nbf`), if it names one.
    pub not_before: Option<SystemTime>,
    /// The key that verified it.
    pub key: KeyTag,
}

/// How many bytes of verified tokens are remembered (about 16,000 tokens of typical size).
/// Callers reuse a token for many calls (a gateway, a dashboard), so a hit skips base64, two
/// JSON parses and the HMAC; a miss costs one verification. Weighed in bytes, not tokens, so
/// large tokens cannot make it hold more memory than this.
const VERIFIED_TOKEN_BYTES: u64 = 8 * 1024 * 1024;

/// Weighs a remembered token by what it holds: the token itself and its caller.
#[derive(Clone)]
struct TokenBytes;

impl quick_cache::Weighter<String, Verified> for TokenBytes {
    fn weight(&self, token: &String, verified: &Verified) -> u64 {
        (token.len() + verified.caller.identity.len() + 128) as u64
    }
}

/// Verifies bearer tokens; cheap to clone (the key and the cache are shared).
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Verifier>,
}

/// Which key of a [`KeySet`] verified a token: a digest of its kid and its secret, so a key
/// that a reload removes (or replaces under the same kid) is told from one it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyTag(u64);

impl KeyTag {
    fn of(kid: Option<&str>, secret: &[u8]) -> Self {
        let mut hash = Sha256::new();
        hash.update([u8::from(kid.is_some())]);
        hash.update(kid.unwrap_or_default().as_bytes());
        hash.update([0]);
        hash.update(secret);
        let digest = hash.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Self(u64::from_le_bytes(first))
    }
}

/// One key a server verifies with.
struct Key {
    decoding: DecodingKey,
    tag: KeyTag,
    /// Cancelled when a reload removes the key: the `Events` streams of its tokens end then.
    retired: CancellationToken,
}

/// The decoding keys of a [`KeySet`].
struct Keys {
    /// For tokens without a `kid`: the first key.
    default: Arc<Key>,
    /// By `kid`; empty for a bare secret, which no `kid` may name.
    by_kid: Vec<(String, Arc<Key>)>,
}

impl Keys {
    /// The keys of `set`, keeping the retirement of those `before` held too.
    fn of(set: &KeySet, before: Option<&Keys>) -> Self {
        let key = |kid: Option<&String>, secret: &[u8]| {
            let tag = KeyTag::of(kid.map(String::as_str), secret);
            let retired = before
                .and_then(|keys| keys.held(tag))
                .map_or_else(CancellationToken::new, |key| key.retired.clone());
            Arc::new(Key {
                decoding: DecodingKey::from_secret(secret),
                tag,
                retired,
            })
        };
        let by_kid: Vec<(String, Arc<Key>)> = set
            .keys
            .iter()
            .filter_map(|(kid, secret)| Some((kid.clone()?, key(kid.as_ref(), secret))))
            .collect();
        let default = match by_kid.first() {
            Some((_, first)) => first.clone(),
            None => key(None, &set.keys[0].1),
        };
        Self { default, by_kid }
    }

    /// Every key, each once.
    fn all(&self) -> impl Iterator<Item = &Arc<Key>> {
        std::iter::once(&self.default).chain(
            self.by_kid
                .iter()
                .map(|(_, key)| key)
                .filter(|key| key.tag != self.default.tag),
        )
    }

    /// The key `tag` names, if it is one of these.
    fn held(&self, tag: KeyTag) -> Option<&Arc<Key>> {
        self.all().find(|key| key.tag == tag)
    }

    /// The key a token's header names, or why there is none.
    fn for_kid(&self, kid: Option<&str>) -> Result<&Arc<Key>, Error> {
        let Some(kid) = kid else {
            return Ok(&self.default);
        };
        if self.by_kid.is_empty() {
            return Err(Error::Unauthenticated(
                "the token names a kid, but this server has a single secret without one".into(),
            ));
        }
        self.by_kid
            .iter()
            .find(|(k, _)| k == kid)
            .map(|(_, key)| key)
            .ok_or_else(|| {
                Error::Unauthenticated("the token's kid names no key of this server".into())
            })
    }
}

struct Verifier {
    /// Replaced as a whole on reload (SIGHUP), so a verification uses one consistent set.
    keys: RwLock<Arc<Keys>>,
    validation: Validation,
    /// Tokens already verified: keyed by the whole token, so a hit is the same signed bytes,
    /// and the expiry is checked again on every hit.
    verified: quick_cache::sync::Cache<String, Verified, TokenBytes>,
    /// What `exp` and `nbf` are checked against.
    clock: Clock,
}

impl Verified {
    /// Why the token is not valid at `now`, if it is not: from `exp` on, as RFC 7519 says ("the
    /// current time MUST be before the expiration time"), and before `nbf`.
    fn check_time(&self, now: SystemTime) -> Result<(), Error> {
        if now >= self.expires_at {
            return Err(Error::Unauthenticated("the token has expired".into()));
        }
        if self.not_before.is_some_and(|nbf| now < nbf) {
            return Err(Error::Unauthenticated(
                "the token is not valid yet (its nbf is in the future)".into(),
            ));
        }
        Ok(())
    }
}

/// Says in plain words why jsonwebtoken refused a token (its own messages name parser internals).
fn refusal(token: &str, kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::InvalidSignature => {
            "the token's signature does not match (another secret, or the token was altered)".into()
        }
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "the token must be signed with HS256".into()
        }
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::InvalidAudience => "the token's aud does not name this server".into(),
        ErrorKind::InvalidIssuer => "the token's iss is not the issuer this server trusts".into(),
        ErrorKind::MissingRequiredClaim(claim) => {
            format!("the token lacks a valid {claim:?} claim (exp and nbf are seconds since 1970)")
        }
        ErrorKind::InvalidClaimFormat(claim) => format!("the token's {claim:?} claim is malformed"),
        _ if jsonwebtoken::decode_header(token).is_err() => {
            "malformed token: expected a JWT whose header is {\"alg\":\"HS256\"}".into()
        }
        _ => "malformed token: expected claims sub, room and role (strings) and exp (a number)"
            .into(),
    }
}

impl Authenticator {
    /// An authenticator for tokens signed with `secret`, with no `iss` or `aud` required.
    pub fn new(secret: &[u8]) -> Self {
        Self::with_rules(
            &KeySet::single(secret),
            &TokenRules::default(),
            Clock::system(),
        )
    }

    /// An authenticator for tokens signed with `keys` that also meet `rules`, at the time
    /// `clock` tells.
    pub fn with_rules(keys: &KeySet, rules: &TokenRules, clock: Clock) -> Self {
        // The algorithm is pinned: a token naming any other (none, HS384, RS256...) is refused.
        let mut validation = Validation::new(Algorithm::HS256);
        let mut required = vec!["exp", "sub"];
        // `exp` and `nbf` are checked here, exactly; jsonwebtoken's own checks round fractional
        // NumericDates to whole seconds.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.validate_aud = rules.audience.is_some();
        if let Some(audience) = &rules.audience {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        if let Some(issuer) = &rules.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Self {
            inner: Arc::new(Verifier {
                keys: RwLock::new(Arc::new(Keys::of(keys, None))),
                validation,
                verified: quick_cache::sync::Cache::with_weighter(
                    16_384,
                    VERIFIED_TOKEN_BYTES,
                    TokenBytes,
                ),
                clock,
            }),
        }
    }

    /// Verifies a raw token and returns the caller it names, with its expiry.
    pub fn verify(&self, token: &str) -> Result<Verified, Error> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Error::Unauthenticated(format!(
                "the token is {} bytes; tokens over {MAX_TOKEN_BYTES} bytes are refused",
                token.len()
            )));
        }
        let verifier = &*self.inner;
        let verified = match verifier.verified.get(token) {
            Some(verified) => verified,
            None => {
                let keys = verifier
                    .keys
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let header = jsonwebtoken::decode_header(token)
                    .map_err(|err| Error::Unauthenticated(refusal(token, err.kind())))?;
                if header.crit.is_some() {
                    return Err(Error::Unauthenticated(
                        "the token's header names critical extensions (crit), which this \
                         server does not understand"
                            .into(),
                    ));
                }
                let key = keys.for_kid(header.kid.as_deref())?;
                let data = jsonwebtoken::decode::<DecodedClaims>(
                    token,
                    &key.decoding,
                    &verifier.validation,
                )
                .map_err(|err| Error::Unauthenticated(refusal(token, err.kind())))?;
                let malformed = |claim: &str| {
                    Error::Unauthenticated(format!("the token's {claim:?} claim is malformed"))
                };
                let expires_at = numeric_date(data.claims.exp).ok_or_else(|| malformed("exp"))?;
                let not_before = match data.claims.nbf {
                    Some(nbf) => Some(numeric_date(nbf).ok_or_else(|| malformed("nbf"))?),
                    None => None,
                };
                let verified = Verified {
                    caller: data.claims.into_caller()?,
                    expires_at,
                    not_before,
                    key: key.tag,
                };
                verifier.verified.insert(token.to_owned(), verified.clone());
                verified
            }
        };
        verified.check_time(verifier.clock.now())?;
        Ok(verified)
    }

    /// Verifies from now on with `keys` (a rotation). Tokens remembered as verified are
    /// verified again, so the tokens of a removed key stop working at once, and the `Events`
    /// streams they opened end (see [`TokenGrant::retired`]).
    pub fn reload(&self, keys: &KeySet) {
        let mut current = self.inner.keys.write().unwrap_or_else(|p| p.into_inner());
        let next = Keys::of(keys, Some(&current));
        for gone in current.all().filter(|key| next.held(key.tag).is_none()) {
            gone.retired.cancel();
        }
        *current = Arc::new(next);
        drop(current);
        self.inner.verified.clear();
    }

    /// What ends the streams of tokens verified by `key`: cancelled when a reload removes it
    /// (already cancelled if one did since the token was verified).
    fn retirement(&self, key: KeyTag) -> CancellationToken {
        let keys = self.inner.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.held(key).map_or_else(
            || {
                let retired = CancellationToken::new();
                retired.cancel();
                retired
            },
            |key| key.retired.clone(),
        )
    }

    /// Reads `authorization: Bearer <token>` from request metadata and verifies it. A call with
    /// two `authorization` headers is refused rather than resolved by taking one of them.
    pub fn authenticate(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Verified, Error> {
        let mut headers = metadata.get_all("authorization").iter();
        let header = headers.next().ok_or_else(|| {
            Error::Unauthenticated("missing authorization: Bearer <token>".into())
        })?;
        if headers.next().is_some() {
            return Err(Error::Unauthenticated(
                "the call carries more than one authorization header; send exactly one".into(),
            ));
        }
        let header = header
            .to_str()
            .map_err(|_| Error::Unauthenticated("authorization header is not text".into()))?;
        let token = match header.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token,
            _ => {
                return Err(Error::Unauthenticated(
                    "authorization must be \"Bearer <token>\"".into(),
                ))
            }
        };
        self.verify(token.trim())
    }
}

/// What ends the `Events` streams of a call's token: its expiry, and the removal of the key
/// that verified it (a key rotation revokes its tokens, open streams included).
#[derive(Debug, Clone)]
pub struct TokenGrant {
    /// When the token stops being valid, on tokio's clock (a deadline for a timer).
    pub expires: tokio::time::Instant,
    /// Cancelled when a reload removes the token's key.
    pub retired: CancellationToken,
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let verified = self.authenticate(request.metadata())?;
        let left = verified.expires_at.duration_since(self.inner.clock.now());
        let grant = TokenGrant {
            expires: tokio::time::Instant::now() + left.unwrap_or_default(),
            retired: self.retirement(verified.key),
        };
        request.extensions_mut().insert(verified.caller);
        request.extensions_mut().insert(grant);
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

    const SECRET: &[u8] = b"unit-test-secret-of-32-bytes-at-least";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn signed(claims: serde_json::Value, algorithm: Algorithm) -> String {
        jsonwebtoken::encode(
            &Header::new(algorithm),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn token(role: &str, room: &str, ttl_secs: i64) -> String {
        let exp = now() as i64 + ttl_secs;
        signed(
            serde_json::json!({"sub": "ann", "room": room, "role": role, "exp": exp}),
            Algorithm::HS256,
        )
    }

    fn unauthenticated(result: Result<Verified, Error>) -> String {
        match result {
            Err(Error::Unauthenticated(msg)) => msg,
            other => panic!("expected UNAUTHENTICATED, got {other:?}"),
        }
    }

    #[test]
    fn a_good_token_names_its_caller() {
        let auth = Authenticator::new(SECRET);
        let verified = auth.verify(&token("moderator", "r1", 60)).unwrap();
        let caller = verified.caller;
        assert_eq!(caller.identity, "ann");
        assert_eq!(caller.scope, RoomScope::One("r1".into()));
        assert_eq!(caller.role, TokenRole::Moderator);
        assert!(verified.expires_at >= SystemTime::now() + Duration::from_secs(59));
        let service = auth.verify(&token("service", "*", 60)).unwrap().caller;
        assert_eq!(service.scope, RoomScope::All);
    }

    #[test]
    fn bad_tokens_are_unauthenticated() {
        let auth = Authenticator::new(SECRET);
        assert!(unauthenticated(auth.verify(&token("moderator", "r", -10))).contains("expired"));
        assert!(unauthenticated(auth.verify(&token("participant", "*", 60))).contains("service"));
        assert!(unauthenticated(auth.verify(&token("admin", "r", 60))).contains("role"));
        assert!(unauthenticated(auth.verify(&token("moderator", "a/b", 60))).contains("room"));
        let other = Authenticator::new(b"another secret that is long enough!");
        assert!(unauthenticated(other.verify(&token("moderator", "r", 60))).contains("signature"));
        assert!(unauthenticated(auth.verify("not.a.token")).contains("malformed"));
    }

    #[test]
    fn expiry_is_exact_to_the_second() {
        let auth = Authenticator::new(SECRET);
        // exp = the current second: RFC 7519 says now must be before exp, so it is refused.
        assert!(unauthenticated(auth.verify(&token("moderator", "r", 0))).contains("expired"));
        assert!(auth.verify(&token("moderator", "r", 2)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_remembered_token_still_expires() {
        let keys = KeySet::single(SECRET);
        let auth = Authenticator::with_rules(&keys, &TokenRules::default(), Clock::tokio());
        let token = mint(
            SECRET,
            &Claims::new("ann", "r", "moderator", Duration::from_secs(60)),
        );
        assert!(auth.verify(&token).is_ok());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(auth.verify(&token).is_ok(), "remembered");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(unauthenticated(auth.verify(&token)).contains("expired"));
    }

    #[test]
    fn not_before_is_enforced() {
        let auth = Authenticator::new(SECRET);
        let claims = |nbf: u64| serde_json::json!({"sub": "a", "room": "r", "role": "moderator", "exp": now() + 60, "nbf": nbf});
        let early = signed(claims(now() + 30), Algorithm::HS256);
        assert!(unauthenticated(auth.verify(&early)).contains("not valid yet"));
        assert!(auth
            .verify(&signed(claims(now()), Algorithm::HS256))
            .is_ok());
    }

    #[test]
    fn numeric_dates_may_have_a_fraction() {
        let auth = Authenticator::new(SECRET);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let with = |exp: f64, nbf: f64| {
            signed(
                serde_json::json!({"sub": "a", "room": "r", "role": "moderator", "exp": exp, "nbf": nbf}),
                Algorithm::HS256,
            )
        };
        let verified = auth.verify(&with(now + 60.5, now - 0.25)).unwrap();
        let exp = verified.expires_at.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(
            exp.subsec_millis(),
            Duration::from_secs_f64(now + 60.5).subsec_millis()
        );
        assert!(unauthenticated(auth.verify(&with(now - 0.5, now - 9.0))).contains("expired"));
        assert!(
            unauthenticated(auth.verify(&with(now + 60.0, now + 30.5))).contains("not valid yet")
        );
        assert!(unauthenticated(auth.verify(&with(-1.5, now))).contains("exp"));
    }

    #[test]
    fn critical_header_extensions_are_refused() {
        let auth = Authenticator::new(SECRET);
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["exp".into()]);
        let claims = Claims::new("ann", "r", "moderator", Duration::from_secs(60));
        let token =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(SECRET)).unwrap();
        assert!(unauthenticated(auth.verify(&token)).contains("crit"));
    }

    #[test]
    fn one_authorization_header_whatever_the_case_of_its_scheme() {
        let auth = Authenticator::new(SECRET);
        let good = token("moderator", "r", 60);
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert("authorization", format!("{scheme} {good}").parse().unwrap());
            assert!(auth.authenticate(&metadata).is_ok(), "{scheme}");
        }
        let mut two = tonic::metadata::MetadataMap::new();
        two.append("authorization", format!("Bearer {good}").parse().unwrap());
        two.append("authorization", format!("Bearer {good}").parse().unwrap());
        let refused = auth.authenticate(&two);
        assert!(matches!(refused, Err(Error::Unauthenticated(m)) if m.contains("more than one")));
        let mut basic = tonic::metadata::MetadataMap::new();
        basic.insert("authorization", "Basic YTpi".parse().unwrap());
        assert!(auth.authenticate(&basic).is_err());
    }

    #[test]
    fn identities_follow_the_contract_limits() {
        let auth = Authenticator::new(SECRET);
        let with_sub = |sub: &str| {
            signed(
                serde_json::json!({"sub": sub, "room": "r", "role": "moderator", "exp": now() + 60}),
                Algorithm::HS256,
            )
        };
        assert!(auth.verify(&with_sub(&"s".repeat(128))).is_ok());
        assert!(unauthenticated(auth.verify(&with_sub(&"s".repeat(129)))).contains("128"));
    }

    #[test]
    fn other_algorithms_are_refused_in_plain_words() {
        let claims = Claims::new("ann", "r", "moderator", Duration::from_secs(60));
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        let auth = Authenticator::new(SECRET);
        assert!(unauthenticated(auth.verify(&hs384)).contains("HS256"));
        // `alg: none` is not even an algorithm jsonwebtoken knows; say what is expected instead
        // of quoting its parser.
        let body = hs384.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{body}.");
        let msg = unauthenticated(auth.verify(&none));
        assert!(msg.contains("HS256") && !msg.contains("variant"), "{msg}");
    }

    #[test]
    fn malformed_claims_are_described_not_quoted() {
        let auth = Authenticator::new(SECRET);
        let token = signed(
            serde_json::json!({"sub": 7, "room": "r", "role": "moderator", "exp": now() + 60}),
            Algorithm::HS256,
        );
        let msg = unauthenticated(auth.verify(&token));
        assert!(
            msg.contains("sub, room and role") && !msg.contains("invalid type"),
            "{msg}"
        );
    }

    #[test]
    fn every_claim_is_required() {
        let auth = Authenticator::new(SECRET);
        let exp = now() + 60;
        for claims in [
            serde_json::json!({"room": "r", "role": "moderator", "exp": exp}),
            serde_json::json!({"sub": "a", "role": "moderator", "exp": exp}),
            serde_json::json!({"sub": "a", "room": "r", "exp": exp}),
            serde_json::json!({"sub": "a", "room": "r", "role": "moderator"}),
        ] {
            unauthenticated(auth.verify(&signed(claims, Algorithm::HS256)));
        }
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let rules = TokenRules {
            issuer: Some("idp".into()),
            audience: Some("roomctl-prod".into()),
        };
        let strict = Authenticator::with_rules(&KeySet::single(SECRET), &rules, Clock::system());
        let exp = now() + 60;
        let token = |extra: serde_json::Value| {
            let mut claims =
                serde_json::json!({"sub": "a", "room": "r", "role": "moderator", "exp": exp});
            claims
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            signed(claims, Algorithm::HS256)
        };
        let right = token(serde_json::json!({"iss": "idp", "aud": "roomctl-prod"}));
        assert!(strict.verify(&right).is_ok());
        let listed = token(serde_json::json!({"iss": "idp", "aud": ["other", "roomctl-prod"]}));
        assert!(strict.verify(&listed).is_ok());
        let wrong_aud = token(serde_json::json!({"iss": "idp", "aud": "roomctl-dev"}));
        assert!(unauthenticated(strict.verify(&wrong_aud)).contains("aud"));
        let wrong_iss = token(serde_json::json!({"iss": "someone", "aud": "roomctl-prod"}));
        assert!(unauthenticated(strict.verify(&wrong_iss)).contains("iss"));
        let bare = token(serde_json::json!({}));
        assert!(unauthenticated(strict.verify(&bare)).contains("lacks"));
        // A server without rules ignores them.
        assert!(Authenticator::new(SECRET).verify(&wrong_aud).is_ok());
    }

    const OLD: &str = "old-key-0123456789abcdef0123456789abcdef";
    const NEW: &str = "new-key-0123456789abcdef0123456789abcdef";

    #[test]
    fn secret_files_hold_one_bare_secret_or_kid_lines() {
        let bare = KeySet::parse(&format!("  {OLD}\n")).unwrap();
        assert!(bare.kids().is_empty());
        // Base64 padding is part of a bare secret, not a kid separator.
        let padded = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==";
        assert!(KeySet::parse(padded).unwrap().kids().is_empty());
        let keyed = KeySet::parse(&format!("2026-11={NEW}\n\n2026-10={OLD}\n")).unwrap();
        assert_eq!(keyed.kids(), ["2026-11", "2026-10"]);
        assert!(KeySet::parse(&format!("a={NEW}\nnot a key line"))
            .unwrap_err()
            .contains("line 2"));
        assert!(KeySet::parse(&format!("a={NEW}\na={OLD}"))
            .unwrap_err()
            .contains("twice"));
        assert!(
            KeySet::parse(&format!("{}={NEW}", "k".repeat(65))).is_ok_and(|k| k.kids().is_empty()),
            "a line whose kid is too long is one bare secret"
        );
        assert!(KeySet::parse("k=short")
            .unwrap_err()
            .contains("at least 32"));
        assert!(KeySet::parse(" \n").is_err());
    }

    #[test]
    fn keys_are_chosen_by_kid_and_tokens_without_one_use_the_first() {
        let keys = KeySet::parse(&format!("new={NEW}\nold={OLD}")).unwrap();
        let auth = Authenticator::with_rules(&keys, &TokenRules::default(), Clock::system());
        let claims = Claims::new("ann", "r", "moderator", Duration::from_secs(60));
        for kid in ["new", "old"] {
            let token = mint_with(&keys, Some(kid), &claims).unwrap();
            assert!(auth.verify(&token).is_ok(), "{kid}");
        }
        assert!(
            auth.verify(&mint(NEW.as_bytes(), &claims)).is_ok(),
            "no kid: the first key"
        );
        let old_without_kid = mint(OLD.as_bytes(), &claims);
        assert!(unauthenticated(auth.verify(&old_without_kid)).contains("signature"));
        let unknown = sign(NEW.as_bytes(), Some("other"), &claims);
        assert!(unauthenticated(auth.verify(&unknown)).contains("kid"));
        assert!(mint_with(&keys, Some("other"), &claims).is_err());
        // A single bare secret knows no kid at all.
        let bare = Authenticator::new(NEW.as_bytes());
        let named = sign(NEW.as_bytes(), Some("new"), &claims);
        assert!(unauthenticated(bare.verify(&named)).contains("kid"));
    }

    #[test]
    fn a_reload_drops_removed_keys_even_for_remembered_tokens() {
        let both = KeySet::parse(&format!("new={NEW}\nold={OLD}")).unwrap();
        let auth = Authenticator::with_rules(&both, &TokenRules::default(), Clock::system());
        let claims = Claims::new("ann", "r", "moderator", Duration::from_secs(60));
        let old = mint_with(&both, Some("old"), &claims).unwrap();
        assert!(auth.verify(&old).is_ok(), "verified, and remembered");
        auth.reload(&KeySet::parse(&format!("new={NEW}")).unwrap());
        assert!(unauthenticated(auth.verify(&old)).contains("kid"));
        let new = mint_with(&both, Some("new"), &claims).unwrap();
        assert!(auth.verify(&new).is_ok());
    }

    #[test]
    fn a_reload_retires_removed_keys_only() {
        let both = KeySet::parse(&format!("new={NEW}\nold={OLD}")).unwrap();
        let auth = Authenticator::with_rules(&both, &TokenRules::default(), Clock::system());
        let claims = Claims::new("ann", "r", "moderator", Duration::from_secs(60));
        let grant = |kid| {
            auth.retirement(
                auth.verify(&mint_with(&both, Some(kid), &claims).unwrap())
                    .unwrap()
                    .key,
            )
        };
        let (old, new) = (grant("old"), grant("new"));
        // Reloading the same keys, reordered, retires nothing.
        auth.reload(&KeySet::parse(&format!("old={OLD}\nnew={NEW}")).unwrap());
        assert!(!old.is_cancelled() && !new.is_cancelled());
        auth.reload(&KeySet::parse(&format!("new={NEW}")).unwrap());
        assert!(old.is_cancelled(), "the removed key's streams end");
        assert!(!new.is_cancelled(), "the kept key's go on");
        // A secret replaced under the same kid is another key.
        auth.reload(&KeySet::parse(&format!("new={OLD}")).unwrap());
        assert!(new.is_cancelled());
    }

    #[test]
    fn oversized_tokens_are_refused_unread() {
        let auth = Authenticator::new(SECRET);
        let msg = unauthenticated(auth.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)));
        assert!(msg.contains("bytes"), "{msg}");
    }

    #[test]
    fn short_secrets_are_refused_with_how_to_make_one() {
        assert!(check_secret(&[7; MIN_SECRET_BYTES]).is_ok());
        let msg = check_secret(b"s3cret").unwrap_err();
        assert!(msg.contains("/dev/urandom"), "{msg}");
    }
}
