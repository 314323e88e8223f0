//! Cluster mode: a server that does not own the Pub/Sub state forwards every
//! connection to the server that does, byte for byte (gRPC, REST, Storage,
//! webhooks, agents, the dashboard alike), so clients may talk to any
//! server. The owner sees the request as sent: its `Host` checks, token and
//! CSRF rules apply unchanged (IP literals are always allowed hosts; a name
//! used for several servers must be an `--allowed-host` of each).

use std::future::Future;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long a forwarded connection waits for the owner to accept it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Accepts on `listener` and pipes each connection to the address `owner`
/// holds at that moment, until `until` resolves; then hands the listener
/// back (the caller serves on it itself). With no owner known, or an owner
/// that does not answer, the connection is closed at once: clients see a
/// reset and retry (gRPC: UNAVAILABLE), as during any failover.
pub async fn forward_until(
    listener: TcpListener,
    owner: watch::Receiver<Option<String>>,
    until: impl Future<Output = ()>,
) -> TcpListener {
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = &mut until => return listener,
            accepted = listener.accept() => {
                let (client, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let target = owner.borrow().clone();
                tokio::spawn(async move {
                    let Some(target) = target else {
                        tracing::debug!(%peer, "no live owner to forward to; closing");
                        return;
                    };
                    pipe(client, &target).await;
                });
            }
        }
    }
}

async fn pipe(mut client: TcpStream, target: &str) {
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await;
    let mut upstream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%target, error = %e, "owner unreachable; closing the forwarded connection");
            return;
        }
        Err(_) => {
            tracing::debug!(%target, "owner did not accept in time; closing");
            return;
        }
    };
    // Request/response protocols: no Nagle delay on either leg.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%target, error = %e, "forwarded connection ended");
    }
}
