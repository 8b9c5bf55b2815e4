//! A RoomControl client that sends a bearer token with every call: what the tests, the
//! benchmarks and any Rust caller need to talk to roomctl.
//!
//! It depends on the generated stubs only, nothing of the server: what it does, any gRPC client
//! can do.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::pb::room_control_client::RoomControlClient;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    /// A header for `token`; None if the token is not valid header text.
    pub fn new(token: &str) -> Option<Self> {
        format!("Bearer {token}").parse().ok().map(Self)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A RoomControl client holding one token.
pub type Client = RoomControlClient<InterceptedService<Channel, Bearer>>;

/// A client on `channel` that authenticates with `token`.
pub fn with_token(channel: Channel, token: &str) -> Result<Client, Status> {
    let bearer = Bearer::new(token)
        .ok_or_else(|| Status::invalid_argument("the token is not valid header text"))?;
    Ok(RoomControlClient::with_interceptor(channel, bearer))
}
