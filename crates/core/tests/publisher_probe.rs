//! The producer's broker probe over a connection that stops answering without closing (a hung
//! broker, a silently dropped route): the probe is cut short by its caller every time, yet the
//! dead connection is retired, and a later probe connects afresh.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ordo_core::secret::Secret;
use ordo_core::servicebus::sender::{
    PublisherFactory, SenderConnections, ServiceBusPublisherFactory,
};
use ordo_testkit::{wait_until, TestServiceBus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP relay to the broker whose connections can be frozen: a frozen one stays open but
/// carries nothing either way, as a connection to a hung broker does. Connections made after a
/// freeze are relayed as usual.
struct Relay {
    addr: std::net::SocketAddr,
    /// Connections numbered below this are frozen.
    frozen_below: Arc<AtomicU64>,
    /// The number the next connection gets.
    next: Arc<AtomicU64>,
}

impl Relay {
    async fn to(target: std::net::SocketAddr) -> Self {
        // The AMQP client always dials 5672: the relay takes another loopback address.
        let mut listener = None;
        for n in 2..250u8 {
            let addr = std::net::SocketAddr::from(([127, 0, n, 201], 5672));
            if let Ok(l) = TcpListener::bind(addr).await {
                listener = Some(l);
                break;
            }
        }
        let listener = listener.expect("a free loopback address for the relay");
        let addr = listener.local_addr().unwrap();
        let frozen_below = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let (frozen, counter) = (frozen_below.clone(), next.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let server = TcpStream::connect(target).await.unwrap();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, n, frozen.clone()));
                tokio::spawn(pipe(sr, cw, n, frozen.clone()));
            }
        });
        Self {
            addr,
            frozen_below,
            next,
        }
    }

    /// Freezes every connection relayed so far.
    fn freeze_current(&self) {
        self.frozen_below
            .store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    n: u64,
    frozen_below: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Ok(read) = from.read(&mut buf).await else {
            return;
        };
        if read == 0 {
            return;
        }
        if n < frozen_below.load(Ordering::SeqCst) {
            // Hung: hold the connection open, carry nothing.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..read]).await.is_err() {
            return;
        }
    }
}

/// `conn` with its endpoint (`Endpoint=sb://HOST[:PORT];…`) pointed at `addr` (port 5672).
fn via(conn: &str, addr: std::net::SocketAddr) -> String {
    let (head, rest) = conn.split_once("sb://").unwrap();
    let tail = rest.find(';').map_or("", |i| &rest[i..]);
    format!("{head}sb://{}{tail}", addr.ip())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_cut_short_on_a_hung_connection_still_retires_it() {
    let sb = TestServiceBus::start().await.unwrap();
    if sb.is_external() {
        eprintln!("skipped: relays to the emulator");
        return;
    }
    let relay = Relay::to(sb.emulator().unwrap().address()).await;
    let conn = via(sb.connection_string(), relay.addr);
    let factory = ServiceBusPublisherFactory {
        connection_string: Secret::new(conn),
        topic: sb.topic().to_string(),
        identifier: "probe-test".into(),
        max_batch_bytes: None,
        send_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        connections: SenderConnections::shared(1),
    };
    // As the producer's probe does, the caller gives each probe less time than a connect.
    // Boxed: the probe's future is large for a test thread's stack.
    let probe = || tokio::time::timeout(Duration::from_millis(300), Box::pin(factory.probe()));
    probe()
        .await
        .expect("answered")
        .expect("a live broker answers");

    relay.freeze_current();
    assert!(
        probe().await.is_err(),
        "a probe on the hung connection is cut short"
    );
    // Each later probe is cut short as well, but the one that found the connection hung
    // retires it at its own bound, and the next probe connects afresh (the relay carries new
    // connections).
    wait_until(Duration::from_secs(10), || async {
        matches!(probe().await, Ok(Ok(())))
    })
    .await;
}
