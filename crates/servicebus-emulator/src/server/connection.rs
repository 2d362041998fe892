//! Connections: the TCP listeners (plain and TLS), the AMQP handshake (SASL, open, the
//! round-trip delay), and the sessions of each connection, whose attaches go to
//! [`super::on_attach`].

use std::{
    net::Shutdown,
    sync::{atomic::Ordering, Arc},
};

use fe2o3_amqp::{
    acceptor::{
        ConnectionAcceptor, ListenerConnectionHandle, ListenerSessionHandle, SessionAcceptor,
    },
    connection::ConnectionStopReason,
    session::BeginError,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use super::{delivery, latency, on_attach, request, sasl, ConnCtx, Shared};

/// Accepts connections until `cancel` fires; each connection runs on `tracker`, behind TLS
/// when `tls` is given (the AMQPS listener).
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = cancel.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let ctx = ConnCtx {
                    shared: shared.clone(),
                    id: shared.next_id(),
                    container: Arc::from(format!("conn-{peer}")),
                    auth: Arc::default(),
                    cancel: cancel.child_token(),
                    closed_by_client: Arc::default(),
                    tracker: tracker.clone(),
                };
                tracker.spawn(connection(stream, tls.clone(), ctx));
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// How long a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens the AMQP connection (SASL, open) on `stream`, through the round-trip delay if any.
async fn open_amqp<S>(
    stream: S,
    acceptor: &ConnectionAcceptor<(), sasl::Mechanisms>,
    ctx: &ConnCtx,
) -> Result<ListenerConnectionHandle, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    let round_trip = ctx.shared.config.namespace.round_trip;
    let opened = if round_trip.is_zero() {
        acceptor.accept(stream).await
    } else {
        let delayed = latency::delayed(stream, round_trip, &ctx.tracker);
        acceptor.accept(delayed).await
    };
    opened.map_err(|e| e.to_string())
}

async fn connection(stream: TcpStream, tls: Option<TlsAcceptor>, ctx: ConnCtx) {
    // A second handle on the socket lets suspend() cut the connection like a network outage,
    // whatever state the AMQP engine is in.
    let killer = match stream.into_std().and_then(|s| {
        let clone = s.try_clone()?;
        Ok((TcpStream::from_std(s)?, clone))
    }) {
        Ok((stream, killer)) => (stream, killer),
        Err(e) => {
            warn!(error = %e, "cannot set up connection");
            return;
        }
    };
    let (stream, killer) = killer;
    let acceptor = ConnectionAcceptor::builder()
        .container_id("ordo-servicebus-emulator")
        .max_frame_size(65_536u32)
        .channel_max(4096u16)
        .idle_time_out(120_000u32)
        .sasl_acceptor(sasl::Mechanisms::new(ctx.shared.keys(), ctx.auth.clone()))
        .build();
    let accept = async {
        match tls {
            None => open_amqp(stream, &acceptor, &ctx).await,
            Some(tls) => {
                let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream));
                match handshake.await {
                    Ok(Ok(stream)) => open_amqp(stream, &acceptor, &ctx).await,
                    Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
                    Err(_) => Err("TLS handshake timed out".to_owned()),
                }
            }
        }
    };
    let accepted = tokio::select! {
        r = accept => r,
        _ = ctx.cancel.cancelled() => {
            let _ = killer.shutdown(Shutdown::Both);
            return;
        }
    };
    let mut conn = match accepted {
        Ok(conn) => conn,
        Err(e) => {
            debug!(connection = ctx.id, error = %e, "connection handshake failed");
            return;
        }
    };
    ctx.shared.connections.fetch_add(1, Ordering::Relaxed);
    debug!(connection = ctx.id, "connection opened");
    let session_acceptor = SessionAcceptor::new();
    loop {
        tokio::select! {
            session = session_acceptor.accept(&mut conn) => match session {
                Ok(session) => {
                    ctx.shared.sessions_begun.fetch_add(1, Ordering::Relaxed);
                    ctx.tracker.spawn(session_loop(session, ctx.clone()));
                }
                Err(e) => {
                    if matches!(e, BeginError::ConnectionStopped(ConnectionStopReason::RemoteClosed)) {
                        ctx.closed_by_client.store(true, Ordering::Release);
                    }
                    debug!(connection = ctx.id, error = %e, "connection ended");
                    break;
                }
            },
            _ = ctx.cancel.cancelled() => {
                let _ = killer.shutdown(Shutdown::Both);
                break;
            }
        }
    }
    ctx.cancel.cancel();
    let _ = killer.shutdown(Shutdown::Both);
    ctx.shared.connections.fetch_sub(1, Ordering::Relaxed);
    drop(conn);
    debug!(connection = ctx.id, "connection closed");
}

/// Processes the attaches of one AMQP session. Attaches are handled one at a time, but a
/// session receiver that must wait for a session is parked in its own task and comes back
/// through `ready`, so it never blocks other links of the session.
async fn session_loop(mut session: ListenerSessionHandle, ctx: ConnCtx) {
    let routes = Arc::new(request::Routes::default());
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<delivery::Ready>(16);
    loop {
        tokio::select! {
            attach = session.next_incoming_attach() => match attach {
                Some(attach) => on_attach(attach, &mut session, &ctx, &routes, &ready_tx).await,
                None => break,
            },
            Some(ready) = ready_rx.recv() => {
                delivery::complete_session_attach(ready, &mut session, &ctx).await;
            }
            _ = ctx.cancel.cancelled() => break,
        }
    }
    // Grants that arrived after the session ended still hold a session lock: give it back.
    ready_rx.close();
    while let Ok(ready) = ready_rx.try_recv() {
        ready.abandon();
    }
    let _ = session.end().await;
}
