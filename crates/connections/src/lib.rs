//! Connections: pubrun as a *client* of Google's APIs (or of any server
//! that speaks them: another pubrun, an emulator). A [`Connection`] holds a
//! token source ([`credentials`]: Application Default Credentials), a
//! Pub/Sub gRPC client ([`pubsub`]) and a Cloud Storage JSON client
//! ([`storage`]). Every error names the connection and the resource.

pub mod credentials;
pub mod error;
pub mod pubsub;
pub mod storage;

use std::sync::Arc;

use pubrun_core::connection::ConnectionSpec;

pub use credentials::{AccessToken, TokenSource};
pub use error::{ConnError, ErrorKind};
pub use pubsub::RemotePubsub;
pub use storage::RemoteStorage;

/// The clients of one connection, sharing its token cache.
pub struct Connection {
    pub spec: ConnectionSpec,
    pub tokens: Arc<TokenSource>,
    pub pubsub: RemotePubsub,
    pub storage: RemoteStorage,
}

impl Connection {
    /// Resolves the credentials (reads and checks a key file now, so a bad
    /// one is an error when the job is applied) and prepares the clients;
    /// nothing is contacted yet.
    pub fn new(spec: ConnectionSpec) -> Result<Connection, ConnError> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(300))
            .build()
            .map_err(|e| {
                ConnError::new(&spec.name, "http client", ErrorKind::Other, e.to_string())
            })?;
        let tokens = Arc::new(TokenSource::new(
            &spec.name,
            &spec.credentials,
            http.clone(),
        )?);
        let pubsub = RemotePubsub::new(&spec, tokens.clone())?;
        let storage = RemoteStorage::new(&spec, tokens.clone(), http);
        Ok(Connection {
            spec,
            tokens,
            pubsub,
            storage,
        })
    }
}
