//! The one in-process test server of the api tests: an embedded store in a
//! temp dir, a broker, `pubrun_api::serve` on a free port of 127.0.0.1, and
//! clients for both surfaces (REST over HTTP, gRPC).

#![allow(dead_code)]

use std::sync::Arc;

use pubrun_api::pb::publisher_client::PublisherClient;
use pubrun_api::pb::subscriber_client::SubscriberClient;
use pubrun_api::ServeOptions;
use pubrun_broker::Broker;
use pubrun_store::EmbeddedStore;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// Stops serving when dropped (also when a test panics).
pub struct Server {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub http: reqwest::Client,
    pub channel: Channel,
    pub publisher: PublisherClient<Channel>,
    pub subscriber: SubscriberClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(Arc::new(EmbeddedStore::open(dir.path()).unwrap())).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(pubrun_api::serve(
        listener,
        broker,
        ServeOptions::default(),
        async move {
            let _ = rx.await;
        },
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Server {
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        publisher: PublisherClient::new(channel.clone()),
        subscriber: SubscriberClient::new(channel.clone()),
        channel,
        stop: Some(tx),
        _dir: dir,
    }
}
