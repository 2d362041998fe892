//! A network round trip to Azure, played on loopback: every byte the broker writes reaches the
//! client `round_trip` after it was written, in order, while the client's bytes arrive at once.
//! A request (attach, transfer, disposition, `$management` call) therefore sees its answer one
//! round trip later, as it would from a client in the same region as the namespace, and a
//! client that pipelines requests pays the delay once, not per request.
//!
//! The AMQP engine talks to one end of an in-memory pipe; two pumps move bytes between its other
//! end and the socket, the outbound one holding each chunk until its time.

use std::time::Duration;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream},
    sync::mpsc,
    time::Instant,
};
use tokio_util::task::TaskTracker;

/// Size of the in-memory pipe; larger than one AMQP frame (64 KiB) so a frame is never split
/// by back-pressure alone.
const PIPE_BYTES: usize = 256 * 1024;

/// Wraps `io` so everything written to the returned stream reaches `io` `delay` later. The
/// pumps end when either side closes.
pub(crate) fn delayed<S>(io: S, delay: Duration, tracker: &TaskTracker) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (engine, pipe) = tokio::io::duplex(PIPE_BYTES);
    let (mut socket_read, mut socket_write) = tokio::io::split(io);
    let (mut pipe_read, mut pipe_write) = tokio::io::split(pipe);
    tracker.spawn(async move {
        let _ = tokio::io::copy(&mut socket_read, &mut pipe_write).await;
        let _ = pipe_write.shutdown().await;
    });
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tracker.spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match pipe_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    tracker.spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if socket_write.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = socket_write.shutdown().await;
    });
    engine
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_written_arrive_after_the_delay_in_order_and_reads_do_not_wait() {
        let (client, server) = tokio::io::duplex(1024);
        let tracker = TaskTracker::new();
        let delay = Duration::from_millis(50);
        let mut engine = delayed(server, delay, &tracker);
        let (mut client_read, mut client_write) = tokio::io::split(client);

        let started = Instant::now();
        client_write.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        engine.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        assert!(started.elapsed() < delay, "inbound bytes are not delayed");

        let written = Instant::now();
        engine.write_all(b"one").await.unwrap();
        engine.write_all(b"two").await.unwrap();
        let mut answer = [0u8; 6];
        client_read.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"onetwo");
        assert!(written.elapsed() >= delay, "outbound bytes wait {delay:?}");
    }
}
