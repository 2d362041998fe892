//! Request/response nodes: `$cbs` (put-token) and each entity's `$management`.
//!
//! Clients differ in how they pair requests and replies: azservicebus attaches a reply
//! receiver whose target is its client node and names it in `reply-to`; pyamqp-based SDKs send
//! no `reply-to` and expect the answer on their receiver attached to the same node, matched by
//! `correlation-id`. [`Routes`] serves both.

use std::sync::{Arc, Mutex};

use fe2o3_amqp::{
    acceptor::{LinkAcceptor, LinkEndpoint, ListenerSessionHandle},
    link::{delivery::Sendable, Receiver, Sender},
};
use fe2o3_amqp_types::{
    messaging::{AmqpValue, ApplicationProperties, Body, Message, MessageAnnotations, Properties},
    performatives::Attach,
    primitives::{Array, Binary, OrderedMap, SimpleValue, Symbol, Timestamp, Value},
};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, warn};

use super::{outcome::DelayedAccept, ConnCtx};
use crate::{
    store::{
        now_ms, AmqpMessage, DeferredError, Delivery, Entity, LockError, Part, Settle, Stored,
    },
    wire,
};

/// How long a request waits for its reply link to be attached.
const REPLY_ROUTE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Largest number of messages one peek returns, whatever the client asks.
const MAX_PEEK: usize = 1000;

/// Which node a request link talks to.
#[derive(Debug, Clone)]
pub(crate) enum Node {
    Cbs,
    Management {
        entity: Option<Arc<Entity>>,
        part: Part,
        path: String,
    },
}

#[derive(Debug)]
struct Route {
    id: u64,
    target: Option<String>,
    node: String,
    tx: mpsc::Sender<AmqpMessage>,
}

/// Reply links of one AMQP session.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    routes: Mutex<Vec<Route>>,
    added: Notify,
}

impl Routes {
    fn find(&self, reply_to: Option<&str>, node: &str) -> Option<mpsc::Sender<AmqpMessage>> {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let by_target = reply_to.and_then(|r| {
            routes
                .iter()
                .find(|route| route.target.as_deref() == Some(r))
        });
        by_target
            .or_else(|| routes.iter().rev().find(|route| route.node == node))
            .map(|route| route.tx.clone())
    }

    async fn wait_for(
        &self,
        reply_to: Option<&str>,
        node: &str,
    ) -> Option<mpsc::Sender<AmqpMessage>> {
        let deadline = tokio::time::Instant::now() + REPLY_ROUTE_WAIT;
        loop {
            let added = self.added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            if let Some(tx) = self.find(reply_to, node) {
                return Some(tx);
            }
            if tokio::time::timeout_at(deadline, added).await.is_err() {
                return None;
            }
        }
    }
}

fn node_key(address: &str) -> String {
    crate::namespace::strip_host(address)
        .trim_matches('/')
        .to_ascii_lowercase()
}

pub(crate) async fn accept_reply_link(
    attach: Attach,
    session: &mut ListenerSessionHandle,
    ctx: &ConnCtx,
    routes: &Arc<Routes>,
) {
    let target = super::target_address(&attach);
    let node = attach
        .source
        .as_ref()
        .and_then(|s| s.address.as_ref())
        .map(|a| node_key(a))
        .unwrap_or_default();
    match LinkAcceptor::new()
        .accept_incoming_attach(attach, session)
        .await
    {
        Ok(LinkEndpoint::Sender(sender)) => {
            let (tx, rx) = mpsc::channel(64);
            let id = ctx.shared.next_id();
            routes
                .routes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Route {
                    id,
                    target,
                    node,
                    tx,
                });
            routes.added.notify_waiters();
            let routes = routes.clone();
            let ctx = ctx.clone();
            ctx.tracker.clone().spawn(async move {
                reply_loop(sender, rx, &ctx).await;
                routes
                    .routes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|r| r.id != id);
            });
        }
        Ok(LinkEndpoint::Receiver(_)) => {}
        Err(e) => debug!(connection = ctx.id, error = %e, "reply link attach failed"),
    }
}

async fn reply_loop(mut sender: Sender, mut rx: mpsc::Receiver<AmqpMessage>, ctx: &ConnCtx) {
    loop {
        let message = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return },
            _ = sender.on_detach() => return,
            _ = ctx.cancel.cancelled() => return,
        };
        let sendable = Sendable::builder().message(message).build();
        let sent = sender.send_batchable(sendable).await;
        debug!(
            connection = ctx.id,
            link = sender.name(),
            ok = sent.is_ok(),
            "reply sent"
        );
        match sent {
            // The outcome of a reply carries no information; settle in the background.
            Ok(fut) => {
                ctx.tracker.spawn(async move {
                    let _ = fut.await;
                });
            }
            Err(_) => return,
        }
    }
}

pub(crate) async fn accept_request_link(
    attach: Attach,
    session: &mut ListenerSessionHandle,
    ctx: &ConnCtx,
    routes: &Arc<Routes>,
    node: Node,
) {
    let node_address = super::target_address(&attach)
        .map(|a| node_key(&a))
        .unwrap_or_default();
    match LinkAcceptor::new()
        .accept_incoming_attach(attach, session)
        .await
    {
        Ok(LinkEndpoint::Receiver(receiver)) => {
            ctx.tracker.spawn(request_loop(
                receiver,
                ctx.clone(),
                routes.clone(),
                node,
                node_address,
            ));
        }
        Ok(LinkEndpoint::Sender(_)) => {}
        Err(e) => debug!(connection = ctx.id, error = %e, "request link attach failed"),
    }
}

async fn request_loop(
    mut receiver: Receiver,
    ctx: ConnCtx,
    routes: Arc<Routes>,
    node: Node,
    node_address: String,
) {
    let accepts = DelayedAccept::spawn(receiver.disposer(), &ctx.tracker);
    loop {
        let delivery = tokio::select! {
            d = receiver.recv::<Body<Value>>() => d,
            _ = ctx.cancel.cancelled() => return,
        };
        let Ok(delivery) = delivery else { return };
        let arrived = tokio::time::Instant::now();
        let (info, request) = delivery.into_parts();
        // The client reads the reply only after the request's outcome; it waits in its link
        // buffer meanwhile. The outcome is held back (see `outcome`).
        if !accepts.accept(info, arrived) {
            return;
        }
        let reply = match &node {
            Node::Cbs => put_token(&request),
            Node::Management { entity, part, path } => {
                management(&request, entity.as_deref(), *part, path, &ctx)
            }
        };
        let reply_to = request
            .properties
            .as_ref()
            .and_then(|p| p.reply_to.as_ref())
            .map(|a| a.to_string());
        let status = reply.status;
        let message = reply.into_message(&request);
        match routes.wait_for(reply_to.as_deref(), &node_address).await {
            Some(tx) => {
                debug!(connection = ctx.id, node = %node_address, reply_to = ?reply_to, status, "reply routed");
                let _ = tx.send(message).await;
            }
            None => warn!(
                connection = ctx.id,
                node = %node_address,
                reply_to = ?reply_to,
                "no reply link for request; answer dropped"
            ),
        }
    }
}

/// A management answer before it becomes a message.
struct Reply {
    status: i32,
    description: String,
    condition: Option<&'static str>,
    body: Value,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Self {
            status: 200,
            description: "OK".into(),
            condition: None,
            body,
        }
    }

    fn error(status: i32, condition: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            description: description.into(),
            condition: Some(condition),
            body: Value::Null,
        }
    }

    fn into_message(self, request: &AmqpMessage) -> AmqpMessage {
        // Service Bus answers `$management` with `statusCode`/`statusDescription` and `$cbs` with
        // `status-code`/`status-description`; clients differ in which one they read (Microsoft's
        // Python SDK reads `status-code` on CBS, fe2o3 reads either), so send both spellings.
        let mut app = OrderedMap::new();
        app.insert("statusCode".to_owned(), SimpleValue::Int(self.status));
        app.insert("status-code".to_owned(), SimpleValue::Int(self.status));
        app.insert(
            "statusDescription".to_owned(),
            SimpleValue::String(self.description.clone()),
        );
        app.insert(
            "status-description".to_owned(),
            SimpleValue::String(self.description),
        );
        if let Some(condition) = self.condition {
            app.insert(
                "errorCondition".to_owned(),
                SimpleValue::Symbol(Symbol::from(condition)),
            );
            app.insert(
                "error-condition".to_owned(),
                SimpleValue::Symbol(Symbol::from(condition)),
            );
        }
        let request_props = request.properties.as_ref();
        let properties = Properties {
            correlation_id: request_props.and_then(|p| p.message_id.clone()),
            to: request_props.and_then(|p| p.reply_to.clone()),
            ..Default::default()
        };
        Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(properties),
            application_properties: Some(ApplicationProperties(app)),
            body: Body::Value(AmqpValue(self.body)),
            footer: None,
        }
    }
}

fn app_text<'a>(request: &'a AmqpMessage, name: &str) -> Option<&'a str> {
    match request.application_properties.as_ref()?.0.get(name)? {
        SimpleValue::String(s) => Some(s.as_str()),
        SimpleValue::Symbol(s) => Some(s.as_str()),
        _ => None,
    }
}

/// CBS put-token: every token is accepted (the emulator does not verify signatures), with the
/// 202 status every Service Bus client checks for.
fn put_token(request: &AmqpMessage) -> Reply {
    match app_text(request, "operation") {
        Some("put-token") => Reply {
            status: 202,
            description: "Accepted".into(),
            condition: None,
            body: Value::Null,
        },
        other => Reply::error(
            400,
            wire::ERR_NOT_IMPLEMENTED,
            format!("unsupported $cbs operation {other:?}"),
        ),
    }
}

fn body_map(request: &AmqpMessage) -> Option<&OrderedMap<Value, Value>> {
    match &request.body {
        Body::Value(AmqpValue(Value::Map(map))) => Some(map),
        _ => None,
    }
}

fn field<'a>(map: Option<&'a OrderedMap<Value, Value>>, name: &str) -> Option<&'a Value> {
    map?.get(&Value::String(name.to_owned()))
}

fn text_field(map: Option<&OrderedMap<Value, Value>>, name: &str) -> Option<String> {
    match field(map, name)? {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.to_string()),
        _ => None,
    }
}

fn int_field(map: Option<&OrderedMap<Value, Value>>, name: &str) -> Option<i64> {
    int_of(field(map, name)?)
}

fn int_of(value: &Value) -> Option<i64> {
    Some(match value {
        Value::Long(n) => *n,
        Value::Int(n) => *n as i64,
        Value::Short(n) => *n as i64,
        Value::Uint(n) => *n as i64,
        Value::Ulong(n) => *n as i64,
        Value::Ushort(n) => *n as i64,
        _ => return None,
    })
}

/// The elements of an array (or list) field.
fn items<'a>(map: Option<&'a OrderedMap<Value, Value>>, name: &str) -> Option<&'a [Value]> {
    match field(map, name)? {
        Value::Array(a) => Some(&a.0[..]),
        Value::List(l) => Some(&l[..]),
        _ => None,
    }
}

/// `lock-tokens`: an array of AMQP uuids.
fn lock_tokens(map: Option<&OrderedMap<Value, Value>>) -> Option<Vec<u128>> {
    let tokens = items(map, "lock-tokens")?
        .iter()
        .filter_map(|v| match v {
            Value::Uuid(u) => Some(wire::token_from_uuid(u)),
            _ => None,
        })
        .collect();
    Some(tokens)
}

/// `properties-to-modify` as message annotations.
fn properties_to_modify(map: Option<&OrderedMap<Value, Value>>) -> Option<MessageAnnotations> {
    let Some(Value::Map(props)) = field(map, "properties-to-modify") else {
        return None;
    };
    let annotations = props
        .iter()
        .filter_map(|(k, v)| {
            let key = match k {
                Value::String(s) => Symbol::from(s.as_str()),
                Value::Symbol(s) => s.clone(),
                _ => return None,
            };
            Some((key.into(), v.clone()))
        })
        .collect();
    Some(MessageAnnotations(annotations))
}

fn map_of(entries: Vec<(&str, Value)>) -> Value {
    let mut map = OrderedMap::new();
    for (k, v) in entries {
        map.insert(Value::String(k.to_owned()), v);
    }
    Value::Map(map)
}

fn lock_error(e: LockError) -> Reply {
    match e {
        LockError::SessionLockLost => Reply::error(
            410,
            wire::ERR_SESSION_LOCK_LOST,
            wire::SESSION_LOCK_LOST_TEXT,
        ),
        LockError::MessageLockLost => Reply::error(
            410,
            wire::ERR_MESSAGE_LOCK_LOST,
            wire::MESSAGE_LOCK_LOST_TEXT,
        ),
    }
}

fn management(
    request: &AmqpMessage,
    entity: Option<&Entity>,
    part: Part,
    path: &str,
    ctx: &ConnCtx,
) -> Reply {
    let operation = app_text(request, "operation").unwrap_or_default();
    let link_name = app_text(request, "associated-link-name");
    let map = body_map(request);
    let now = now_ms();
    let Some(entity) = entity else {
        return Reply::error(
            400,
            wire::ERR_NOT_IMPLEMENTED,
            format!("operation {operation} is not available on {path}"),
        );
    };
    debug!(connection = ctx.id, entity = %entity.path, operation, "management request");
    let session_id = text_field(map, "session-id");
    match operation {
        "com.microsoft:renew-session-lock" => {
            let Some(id) = session_id else {
                return Reply::error(400, wire::ERR_ARGUMENT, "session-id is required");
            };
            match entity.renew_session_lock(&id, ctx.id, link_name, now) {
                Ok(until) => Reply::ok(map_of(vec![(
                    "expiration",
                    Value::Timestamp(Timestamp::from_milliseconds(until)),
                )])),
                Err(e) => lock_error(e),
            }
        }
        "com.microsoft:get-session-state" => {
            let Some(id) = session_id else {
                return Reply::error(400, wire::ERR_ARGUMENT, "session-id is required");
            };
            match entity.session_state(&id, ctx.id, link_name, now) {
                // Never null: clients decode the key as binary.
                Ok(state) => Reply::ok(map_of(vec![(
                    "session-state",
                    Value::Binary(Binary::from(state.unwrap_or_default())),
                )])),
                Err(e) => lock_error(e),
            }
        }
        "com.microsoft:set-session-state" => {
            let Some(id) = session_id else {
                return Reply::error(400, wire::ERR_ARGUMENT, "session-id is required");
            };
            let state = match field(map, "session-state") {
                Some(Value::Binary(b)) => Some(b.to_vec()),
                _ => None,
            };
            match entity.set_session_state(&id, state, ctx.id, link_name, now) {
                Ok(()) => Reply::ok(map_of(vec![])),
                Err(e) => lock_error(e),
            }
        }
        "com.microsoft:renew-lock" => {
            let Some(tokens) = lock_tokens(map) else {
                return Reply::error(400, wire::ERR_ARGUMENT, "lock-tokens is required");
            };
            match entity.renew_message_locks(part, &tokens, now) {
                Ok(expirations) => Reply::ok(map_of(vec![(
                    "expirations",
                    Value::Array(Array::from(
                        expirations
                            .into_iter()
                            .map(|t| Value::Timestamp(Timestamp::from_milliseconds(t)))
                            .collect::<Vec<_>>(),
                    )),
                )])),
                Err(e) => lock_error(e),
            }
        }
        "com.microsoft:peek-message" => {
            let from = int_field(map, "from-sequence-number").unwrap_or(0);
            let count = int_field(map, "message-count")
                .unwrap_or(1)
                .clamp(1, MAX_PEEK as i64);
            let peeked = entity.peek(part, from, count as usize, session_id.as_deref());
            if peeked.is_empty() {
                return Reply {
                    status: 204,
                    description: "No Content".into(),
                    condition: None,
                    body: Value::Null,
                };
            }
            let messages = peeked
                .iter()
                .map(|s| {
                    map_of(vec![(
                        "message",
                        Value::Binary(Binary::from(wire::encode_peeked(s))),
                    )])
                })
                .collect();
            Reply::ok(map_of(vec![("messages", Value::List(messages))]))
        }
        "com.microsoft:receive-by-sequence-number" => {
            let Some(seqs) = items(map, "sequence-numbers") else {
                return Reply::error(400, wire::ERR_ARGUMENT, "sequence-numbers is required");
            };
            let seqs: Vec<i64> = seqs.iter().filter_map(int_of).collect();
            // 1 (second) is peek-lock, 0 (first) receive-and-delete.
            let peek_lock = int_field(map, "receiver-settle-mode") != Some(0);
            let received = entity.receive_deferred(
                part,
                &seqs,
                session_id.as_deref(),
                peek_lock,
                ctx.id,
                link_name,
                now,
            );
            match received {
                Ok(received) => {
                    let messages = received
                        .into_iter()
                        .map(|(token, stored)| deferred_reply_entry(token, stored, now))
                        .collect();
                    Reply::ok(map_of(vec![("messages", Value::List(messages))]))
                }
                Err(DeferredError::SessionLockLost) => lock_error(LockError::SessionLockLost),
                Err(DeferredError::NotFound(seq)) => Reply::error(
                    404,
                    wire::ERR_MESSAGE_NOT_FOUND,
                    format!(
                        "Failed to lock one or more specified messages. Either the message is not deferred or it does not exist. Sequence number: {seq}."
                    ),
                ),
            }
        }
        "com.microsoft:update-disposition" => {
            let Some(tokens) = lock_tokens(map) else {
                return Reply::error(400, wire::ERR_ARGUMENT, "lock-tokens is required");
            };
            let props = properties_to_modify(map);
            let settle = match text_field(map, "disposition-status").as_deref() {
                Some("completed") => Settle::Complete,
                Some("abandoned") => Settle::Abandon(props),
                Some("defered") => Settle::Defer(props),
                Some("suspended") => Settle::DeadLetter {
                    reason: text_field(map, "deadletter-reason"),
                    description: text_field(map, "deadletter-description"),
                    properties: props,
                },
                other => {
                    return Reply::error(
                        400,
                        wire::ERR_ARGUMENT,
                        format!("disposition-status {other:?} is not one of completed, abandoned, defered, suspended"),
                    )
                }
            };
            for token in tokens {
                if let Err(e) = entity.settle_by_token(part, token, settle.clone(), now) {
                    return lock_error(e);
                }
            }
            Reply::ok(map_of(vec![]))
        }
        other => Reply::error(
            501,
            wire::ERR_NOT_IMPLEMENTED,
            format!("operation {other} is not supported by the emulator"),
        ),
    }
}

/// One entry of a receive-by-sequence-number answer: the lock token (peek-lock) and the message
/// as a receiver would get it.
fn deferred_reply_entry(token: Option<u128>, stored: Stored, now: i64) -> Value {
    let delivery = Delivery {
        // Receive-and-delete: nothing to settle, but the message still carries a token.
        token: token.unwrap_or_else(|| uuid::Uuid::new_v4().as_u128()),
        seq: stored.seq,
        message: stored.message.clone(),
        enqueued_ms: stored.enqueued_ms,
        delivery_count: stored.delivery_count,
        locked_until_ms: stored.locked_until_ms().unwrap_or(now),
    };
    let message = wire::encode_delivered(wire::delivered_message(&delivery, token.is_some()));
    let mut entry = vec![("message", Value::Binary(Binary::from(message)))];
    if let Some(token) = token {
        entry.push(("lock-token", Value::Uuid(wire::lock_token_uuid(token))));
    }
    map_of(entry)
}
