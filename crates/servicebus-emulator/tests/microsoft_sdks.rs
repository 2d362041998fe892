//! Clients nobody tuned the emulator to: Microsoft's Python SDK (azure-servicebus, its own
//! pure-Python AMQP stack) and JavaScript SDK (@azure/service-bus, on rhea), each pointed at an
//! embedded emulator through its `UseDevelopmentEmulator=true` connection string.
//!
//! The client scripts in `tests/clients/` run the same scenario and assert what Service Bus
//! would answer (send single and batch, named and next-available sessions, order, complete,
//! abandon, dead-letter and the dead-letter queue, defer and receive by sequence number,
//! session state, lock renewal, peek, duplicate detection, lock token from the delivery tag,
//! settling under a lost lock); this test checks the exit status and what the emulator holds
//! afterwards. `scripts/provision.sh` installs both SDKs; without them these tests fail.

mod common;

use std::{path::PathBuf, process::Stdio, time::Duration};

use common::tls::TestCa;
use common::*;
use ordo_servicebus_emulator::{EmulatorConfig, EmulatorHandle};

/// The pinned azure-servicebus release; keep in step with `scripts/provision.sh`.
const PYTHON_SDK_VERSION: &str = "7.15.0";

const TOPIC: &str = "ordo-events";
const SESSION_SUBSCRIPTION: &str = "projector";
const PLAIN_SUBSCRIPTION: &str = "plain";
const SHORT_LOCK_QUEUE: &str = "short-lock";

/// What the scripts expect: a session subscription, a plain one, a queue with a 1 s lock.
const CONFIG: &str = r#"
[[topics]]
name = "ordo-events"
duplicate_detection_window = "10m"

[[topics.subscriptions]]
name = "projector"
requires_session = true
lock_duration = "30s"

[[topics.subscriptions]]
name = "plain"
lock_duration = "30s"

[[queues]]
name = "short-lock"
lock_duration = "1s"
"#;

/// Upper bound for one client script (both take a few seconds).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(50);

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("..")
}

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("clients")
}

fn not_provisioned(what: &str) -> ! {
    panic!(
        "{what}: run scripts/provision.sh (it installs Microsoft's Service Bus SDKs for these \
         tests; the JavaScript one needs Node.js 18+ with npm)"
    )
}

/// Runs a client script against the emulator and fails the test with its output unless it
/// exits with status 0.
async fn run_client(emulator: &EmulatorHandle, program: PathBuf, script: &str) {
    let mut command = tokio::process::Command::new(&program);
    command
        .current_dir(clients_dir())
        .arg(clients_dir().join(script))
        .args([
            emulator.connection_string().as_str(),
            TOPIC,
            SESSION_SUBSCRIPTION,
            PLAIN_SUBSCRIPTION,
            SHORT_LOCK_QUEUE,
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(CLIENT_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within {CLIENT_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    assert!(
        output.status.success(),
        "{script} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

/// What both scenarios leave behind: everything settled, session "a" with its state, one
/// dead-lettered message on the plain subscription.
fn check_emulator_after(emulator: &EmulatorHandle) {
    let stats = emulator.stats();
    let session_path = format!("{TOPIC}/Subscriptions/{SESSION_SUBSCRIPTION}");
    let plain_path = format!("{TOPIC}/Subscriptions/{PLAIN_SUBSCRIPTION}");

    let sessions = stats.entity(&session_path).expect("session subscription");
    assert_eq!(
        (sessions.active, sessions.locked, sessions.deferred),
        (0, 0, 0)
    );
    // The script read its dead-lettered message from the dead-letter queue and completed it.
    assert_eq!(sessions.dead_lettered, 0);
    let a = sessions
        .sessions
        .iter()
        .find(|s| s.id == "a")
        .expect("session a is listed");
    assert!(a.has_state, "the session state the client set is kept");
    assert_eq!(a.active, 0);

    let plain = stats.entity(&plain_path).expect("plain subscription");
    assert_eq!((plain.active, plain.locked, plain.deferred), (0, 0, 0));
    let dead = emulator.dead_letters(&plain_path).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].message_id.as_deref(), Some("b:1"));
    assert_eq!(dead[0].reason.as_deref(), Some("plain-reason"));
    assert_eq!(dead[0].description.as_deref(), Some("b-1 parked"));
    assert_eq!(dead[0].body, b"b-1");
    assert_eq!(dead[0].delivery_count, 0);

    let queue = stats.entity(SHORT_LOCK_QUEUE).expect("queue");
    assert_eq!((queue.active, queue.locked, queue.dead_lettered), (0, 0, 0));
}

async fn start_for_clients() -> EmulatorHandle {
    start(EmulatorConfig::from_toml_str(CONFIG).unwrap()).await
}

/// The Python interpreter of `.venv`, failing the test unless the pinned SDK is installed.
fn provisioned_python() -> PathBuf {
    let python = workspace_root().join(".venv").join("bin").join("python");
    let installed = std::process::Command::new(&python)
        .args([
            "-c",
            "import importlib.metadata as m, azure.servicebus; print(m.version('azure-servicebus'))",
        ])
        .output()
        .unwrap_or_else(|_| not_provisioned(&format!("{} is missing", python.display())));
    let version = String::from_utf8_lossy(&installed.stdout).trim().to_owned();
    if !installed.status.success() || version != PYTHON_SDK_VERSION {
        not_provisioned(&format!(
            "azure-servicebus {PYTHON_SDK_VERSION} is not installed in .venv (found {version:?})"
        ));
    }
    python
}

#[test]
fn python_sdk_azure_servicebus() {
    let python = provisioned_python();
    run(async move {
        let emulator = start_for_clients().await;
        run_client(&emulator, python, "python_sdk.py").await;
        check_emulator_after(&emulator);
        emulator.shutdown().await;
    });
}

#[test]
fn javascript_sdk_azure_service_bus() {
    // The version pinned in package.json must be the one in node_modules.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(clients_dir().join("package.json")).unwrap())
            .unwrap();
    let pinned = manifest["dependencies"]["@azure/service-bus"]
        .as_str()
        .expect("package.json pins @azure/service-bus")
        .to_owned();
    let installed = std::fs::read(
        clients_dir()
            .join("node_modules")
            .join("@azure")
            .join("service-bus")
            .join("package.json"),
    )
    .ok()
    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    .and_then(|m| m["version"].as_str().map(str::to_owned));
    if installed.as_deref() != Some(pinned.as_str()) {
        not_provisioned(&format!(
            "@azure/service-bus {pinned} is not installed in {} (found {installed:?})",
            clients_dir().join("node_modules").display()
        ));
    }
    run(async move {
        let emulator = start_for_clients().await;
        run_client(&emulator, PathBuf::from("node"), "js_sdk.mjs").await;
        check_emulator_after(&emulator);
        emulator.shutdown().await;
    });
}

/// The rules of `azure_rules/` seen through the Python SDK: refused batches on partitioned
/// topics, refused scheduled messages and long ids, a session-less message dead-lettered on the
/// session subscription, dead letters outliving their time-to-live, a closed session receiver's
/// messages redelivered without a higher delivery count.
#[test]
fn python_sdk_meets_the_azure_rules() {
    let python = provisioned_python();
    run(async move {
        let emulator = start(EmulatorConfig::from_toml_str(RULES_CONFIG).unwrap()).await;
        let mut command = tokio::process::Command::new(&python);
        command
            .arg(clients_dir().join("python_rules.py"))
            .arg(emulator.connection_string())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(CLIENT_TIMEOUT, command.output())
            .await
            .expect("python_rules.py finishes")
            .expect("python runs");
        assert!(
            output.status.success(),
            "python_rules.py failed with {}\n--- stdout\n{}\n--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        let dead = emulator.subscription_dead_letters("mixed", "s").unwrap();
        let ids: Vec<_> = dead.iter().map(|d| d.message_id.as_deref()).collect();
        // Both session-less messages the script sent reached the session subscription too.
        assert_eq!(ids, vec![Some("py-n:1"), Some("py-t:1")]);
        assert!(dead
            .iter()
            .all(|d| d.reason.as_deref() == Some("Session id is null.")));
        let stats = emulator.stats();
        assert_eq!(
            stats.entity("part-dedup/Subscriptions/s").unwrap().active,
            2
        );
        assert_eq!(stats.entity("part/Subscriptions/s").unwrap().active, 2);
        assert_eq!(stats.entity("mixed/Subscriptions/s").unwrap().active, 0);
        emulator.shutdown().await;
    });
}

/// A token that expires unrenewed through the Python SDK: its receiver loses the link (see
/// `clients/python_tokens.py`), the emulator counted the detach, and the message sent
/// after the expiry is still on the subscription.
#[test]
fn python_sdk_loses_a_link_whose_token_expired() {
    let python = provisioned_python();
    run(async move {
        let emulator = start(EmulatorConfig::from_toml_str(RULES_CONFIG).unwrap()).await;
        let mut command = tokio::process::Command::new(&python);
        command
            .arg(clients_dir().join("python_tokens.py"))
            .arg(emulator.connection_string())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(CLIENT_TIMEOUT, command.output())
            .await
            .expect("python_tokens.py finishes")
            .expect("python runs");
        assert!(
            output.status.success(),
            "python_tokens.py failed with {}\n--- stdout\n{}\n--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        assert!(emulator.token_expiry_detaches() >= 1);
        let plain = emulator.stats();
        let plain = plain.entity("mixed/Subscriptions/plain").unwrap();
        // Available again, or still locked for the detached link until the lock expires.
        assert_eq!(
            plain.active + plain.locked,
            1,
            "py-exp:2 waits for a receiver with a valid token: {plain:?}"
        );
        emulator.shutdown().await;
    });
}

/// The Python SDK over AMQPS with an Azure-style connection string: trusting the test CA it
/// sends and receives; without it the handshake fails and nothing arrives.
#[test]
fn python_sdk_over_tls_trusts_only_the_configured_ca() {
    let python = provisioned_python();
    run(async move {
        let ca = TestCa::loopback();
        let emulator = start(ca.serve(EmulatorConfig::from_toml_str(CONFIG).unwrap())).await;
        let mut command = tokio::process::Command::new(&python);
        command
            .arg(clients_dir().join("python_tls.py"))
            .arg(emulator.tls_connection_string().unwrap())
            .arg(&ca.ca_file)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(CLIENT_TIMEOUT, command.output())
            .await
            .expect("python_tls.py finishes")
            .expect("python runs");
        assert!(
            output.status.success(),
            "python_tls.py failed with {}\n--- stdout\n{}\n--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        let stats = emulator.stats();
        let plain = stats.entity("ordo-events/Subscriptions/plain").unwrap();
        assert_eq!(
            (plain.active, plain.locked),
            (0, 0),
            "py-tls:1 was completed and py-tls:2 never sent"
        );
        emulator.shutdown().await;
    });
}
