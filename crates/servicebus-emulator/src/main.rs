//! `ordo-servicebus-emulator`: serves the entities of a TOML file over plain AMQP, and over
//! AMQPS (TLS on 5671) when given a certificate and key.

use std::{net::IpAddr, net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::Parser;
use ordo_servicebus_emulator::{Emulator, EmulatorConfig, AMQP_PORT};

/// A Service Bus-compatible AMQP 1.0 broker for tests and local development.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Entity configuration (TOML); the ordo default namespace when absent.
    #[arg(long, env = "ORDO_SERVICEBUS_EMULATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// AMQP port; Service Bus clients other than .NET always dial 5672.
    #[arg(long, default_value_t = AMQP_PORT)]
    port: u16,
    /// Serve the inspection endpoint (JSON) on this address, e.g. 127.0.0.1:5300.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// PEM certificate chain: serve AMQPS on 5671 next to plain AMQP (overrides
    /// `[namespace] tls_cert`).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert` (overrides `[namespace] tls_key`).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => EmulatorConfig::from_file(path)?,
        None => EmulatorConfig::default_ordo(),
    };
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.namespace.tls_cert = Some(cert);
        config.namespace.tls_key = Some(key);
    }
    let emulator = Emulator::start_on(config, SocketAddr::new(args.bind, args.port))
        .await
        .context("cannot start the emulator")?;
    if let Some(addr) = args.http {
        let bound = emulator.serve_http(addr).await?;
        tracing::info!(address = %bound, "inspection endpoint listening");
    }
    let connection_string = emulator.connection_string();
    tracing::info!(connection_string = %connection_string, "ready");
    println!("{connection_string}");
    if let Some(tls) = emulator.tls_connection_string() {
        tracing::info!(connection_string = %tls, "ready over TLS");
        println!("{tls}");
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    emulator.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = ctrl_c => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
