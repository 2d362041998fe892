//! Free loopback ports for stand-ins and daemons' health endpoints.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it). Another process can
/// still take it before the caller binds; callers that start servers retry on address-in-use.
pub fn free_local_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// `127.0.0.1:<free port>`, for a daemon's `/healthz` `/readyz` `/metrics` listener.
pub fn free_health_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_local_port()))
}
