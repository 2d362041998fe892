//! The AMQP connections ordo opens, as sockets.

mod common;

use std::net::SocketAddr;

use common::{message, session_source, TopicSender};
use ordo_testkit::TestServiceBus;
use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};

/// Nagle's algorithm holds a small write back until the previous one is acknowledged, and the
/// peer delays that acknowledgement up to 40 ms. AMQP is small frames in both directions (an
/// attach, a flow, a disposition), so with Nagle on, an accept took about 100 ms and a
/// one-message receive about 65 ms on loopback, and workers sharing a connection queued behind
/// each other's accepts: 600 messages took 28 s on 2 shared connections against 7.6 s with it
/// off. Every connection ordo opens must turn it off (`TCP_NODELAY`), as the emulator does on
/// its side and as Microsoft's AMQP stacks do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_amqp_connection_turns_nagle_off() {
    let sb = TestServiceBus::start().await.unwrap();
    let _source = session_source(&sb, "nodelay-test").await;
    let broker = broker_addr(sb.connection_string());

    // This process's sockets connected to the broker, by duplicating each of its descriptors
    // (pidfd_getfd on our own pid) and asking the duplicate for its peer.
    let me = pidfd_open(getpid(), PidfdFlags::empty()).expect("pidfd_open (Linux 5.3+)");
    let mut checked = 0;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Ok(n) = entry.unwrap().file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(fd) = pidfd_getfd(&me, n, PidfdGetfdFlags::empty()) else {
            continue; // closed since the listing
        };
        let peer = rustix::net::getpeername(&fd)
            .ok()
            .flatten()
            .and_then(|a| SocketAddr::try_from(a).ok());
        if peer != Some(broker) {
            continue;
        }
        assert!(
            rustix::net::sockopt::tcp_nodelay(&fd).unwrap(),
            "the connection on descriptor {n} to the broker at {broker} has Nagle on"
        );
        checked += 1;
    }
    assert!(
        checked >= 1,
        "no connection to the broker at {broker} found"
    );
}

/// `host[:port]` of the connection string's `Endpoint=sb://…`, the emulator's port by default.
fn broker_addr(connection_string: &str) -> SocketAddr {
    let endpoint = connection_string
        .split(';')
        .find_map(|kv| kv.strip_prefix("Endpoint=sb://"))
        .expect("Endpoint=sb:// in the connection string")
        .trim_end_matches('/');
    let with_port = if endpoint.contains(':') {
        endpoint.to_string()
    } else {
        format!("{endpoint}:5672")
    };
    with_port.parse().expect("an IP address endpoint")
}

/// fe2o3-amqp 0.14 registered an unsettled delivery in its link's map only after handing the
/// transfer to its session; an outcome processed before that was dropped, and the send (or a
/// `$management` call, or a `$cbs` token) waited for it until its 20 s timeout. Service Bus
/// answers as soon as it can, and so does the emulator now (no outcome delay), so a thousand
/// sends on one link, each bounded far below that timeout, must all be answered. Without the
/// vendored fix about one in several hundred lost the race under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_that_arrives_at_once_is_never_lost() {
    use std::time::{Duration, Instant};

    let sb = TestServiceBus::start().await.unwrap();
    let mut topic = TopicSender::open(&sb).await;
    let mut slowest = Duration::ZERO;
    for i in 0..1000 {
        let m = message(
            &format!("s{}", i % 10),
            format!("outcome-{i}"),
            format!("{i}"),
        );
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), topic.sender.send_message(m))
            .await
            .unwrap_or_else(|_| panic!("send {i} had no outcome within 5 s"))
            .unwrap();
        slowest = slowest.max(started.elapsed());
    }
    eprintln!("1000 sends, slowest {slowest:?}");
    topic.close().await;
}
