//! The Service Bus fixture: emulators on distinct loopback addresses, suspend and resume.

use std::net::SocketAddr;

use ordo_testkit::servicebus::TestServiceBus;

#[tokio::test]
async fn parallel_emulators_get_distinct_addresses_on_port_5672() {
    let (a, b) = tokio::join!(TestServiceBus::start(), TestServiceBus::start());
    let (a, b) = (a.unwrap(), b.unwrap());
    let (Ok(ea), Ok(eb)) = (a.emulator(), b.emulator()) else {
        return a.emulator().unwrap_err().skip();
    };
    assert_ne!(ea.address(), eb.address());
    for (bus, emulator) in [(&a, ea), (&b, eb)] {
        let addr = emulator.address();
        assert_eq!(addr.port(), 5672);
        assert!(
            bus.connection_string()
                .starts_with(&format!("Endpoint=sb://{};", addr.ip())),
            "{}",
            bus.connection_string()
        );
        assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    }
    assert_eq!((a.topic(), a.subscription()), ("ordo-events", "projector"));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn suspend_refuses_connections_until_resume() {
    let bus = TestServiceBus::start().await.unwrap();
    let addr: SocketAddr = match bus.emulator() {
        Ok(e) => e.address(),
        Err(unavailable) => return unavailable.skip(),
    };
    bus.suspend().await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    bus.resume().await.unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    bus.shutdown().await;
}
