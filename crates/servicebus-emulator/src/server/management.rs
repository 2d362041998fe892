//! `$management` operations of queues and subscriptions, one function each.
//!
//! Requests carry `operation` and `associated-link-name` application properties and an AMQP map
//! body; answers carry `statusCode` (see `request::Reply`). The field names and types are the
//! ones azservicebus (`vendor/azservicebus/src/amqp/management_constants.rs`) and Microsoft's
//! SDKs send.

use fe2o3_amqp_types::{
    messaging::{AmqpValue, Body, MessageAnnotations},
    primitives::{Array, Binary, OrderedMap, Symbol, Timestamp, Value},
};
use tracing::debug;

use super::{
    request::{app_text, Reply},
    ConnCtx,
};
use crate::{
    clock::now_ms,
    store::{AmqpMessage, DeferredError, Delivery, Entity, LockError, Part, Settle, Stored},
    wire,
};

/// Largest number of messages one peek returns, whatever the client asks.
const MAX_PEEK: usize = 1000;

/// One `$management` request, decoded as far as every operation needs.
struct Request<'a> {
    entity: &'a Entity,
    part: Part,
    map: Option<&'a OrderedMap<Value, Value>>,
    session_id: Option<String>,
    link_name: Option<&'a str>,
    connection: u64,
    now: i64,
}

impl Request<'_> {
    fn session_id(&self) -> Result<&str, Reply> {
        self.session_id
            .as_deref()
            .ok_or_else(|| Reply::error(400, wire::ERR_ARGUMENT, "session-id is required"))
    }
}

/// Answers a request on the `$management` node at `path`; `entity` is `None` for a topic's node.
pub(super) fn answer(
    request: &AmqpMessage,
    entity: Option<&Entity>,
    part: Part,
    path: &str,
    ctx: &ConnCtx,
) -> Reply {
    let operation = app_text(request, "operation").unwrap_or_default();
    let Some(entity) = entity else {
        return Reply::error(
            400,
            wire::ERR_NOT_IMPLEMENTED,
            format!("operation {operation} is not available on {path}"),
        );
    };
    debug!(connection = ctx.id, entity = %entity.path, operation, "management request");
    let map = body_map(request);
    let req = Request {
        entity,
        part,
        map,
        session_id: text_field(map, "session-id"),
        link_name: app_text(request, "associated-link-name"),
        connection: ctx.id,
        now: now_ms(),
    };
    let answered = match operation {
        "com.microsoft:renew-session-lock" => renew_session_lock(&req),
        "com.microsoft:get-session-state" => get_session_state(&req),
        "com.microsoft:set-session-state" => set_session_state(&req),
        "com.microsoft:renew-lock" => renew_lock(&req),
        "com.microsoft:peek-message" => Ok(peek_message(&req)),
        "com.microsoft:receive-by-sequence-number" => receive_by_sequence_number(&req),
        "com.microsoft:update-disposition" => update_disposition(&req),
        other => Err(Reply::error(
            501,
            wire::ERR_NOT_IMPLEMENTED,
            format!("operation {other} is not supported by the emulator"),
        )),
    };
    answered.unwrap_or_else(|reply| reply)
}

fn renew_session_lock(req: &Request<'_>) -> Result<Reply, Reply> {
    let until = req
        .entity
        .renew_session_lock(req.session_id()?, req.connection, req.link_name, req.now)
        .map_err(lock_error)?;
    Ok(Reply::ok(map_of(vec![(
        "expiration",
        Value::Timestamp(Timestamp::from_milliseconds(until)),
    )])))
}

fn get_session_state(req: &Request<'_>) -> Result<Reply, Reply> {
    let state = req
        .entity
        .session_state(req.session_id()?, req.connection, req.link_name, req.now)
        .map_err(lock_error)?;
    // Never null: clients decode the key as binary.
    Ok(Reply::ok(map_of(vec![(
        "session-state",
        Value::Binary(Binary::from(state.unwrap_or_default())),
    )])))
}

/// Sets a session's state. A null state clears it; an empty binary is a state, kept present
/// and empty, as on Service Bus, which drops a state only when set to null ("session state
/// remains as long as it is not cleared up (returning null)", Microsoft's message-sessions
/// documentation, per Azure/azure-service-bus#39; Azure/durabletask#1228).
fn set_session_state(req: &Request<'_>) -> Result<Reply, Reply> {
    let state = match field(req.map, "session-state") {
        Some(Value::Binary(b)) => Some(b.to_vec()),
        _ => None,
    };
    req.entity
        .set_session_state(
            req.session_id()?,
            state,
            req.connection,
            req.link_name,
            req.now,
        )
        .map_err(lock_error)?;
    Ok(Reply::ok(map_of(vec![])))
}

fn renew_lock(req: &Request<'_>) -> Result<Reply, Reply> {
    let tokens = lock_tokens(req.map)
        .ok_or_else(|| Reply::error(400, wire::ERR_ARGUMENT, "lock-tokens is required"))?;
    let expirations = req
        .entity
        .renew_message_locks(req.part, &tokens, req.now)
        .map_err(lock_error)?;
    let expirations: Vec<Value> = expirations
        .into_iter()
        .map(|t| Value::Timestamp(Timestamp::from_milliseconds(t)))
        .collect();
    Ok(Reply::ok(map_of(vec![(
        "expirations",
        Value::Array(Array::from(expirations)),
    )])))
}

fn peek_message(req: &Request<'_>) -> Reply {
    let from = int_field(req.map, "from-sequence-number").unwrap_or(0);
    let count = int_field(req.map, "message-count")
        .unwrap_or(1)
        .clamp(1, MAX_PEEK as i64);
    let peeked = req
        .entity
        .peek(req.part, from, count as usize, req.session_id.as_deref());
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

fn receive_by_sequence_number(req: &Request<'_>) -> Result<Reply, Reply> {
    let seqs = items(req.map, "sequence-numbers")
        .ok_or_else(|| Reply::error(400, wire::ERR_ARGUMENT, "sequence-numbers is required"))?;
    let seqs: Vec<i64> = seqs.iter().filter_map(int_of).collect();
    // 1 (second) is peek-lock, 0 (first) receive-and-delete.
    let peek_lock = int_field(req.map, "receiver-settle-mode") != Some(0);
    let received = req.entity.receive_deferred(
        req.part,
        &seqs,
        req.session_id.as_deref(),
        peek_lock,
        req.connection,
        req.link_name,
        req.now,
    );
    match received {
        Ok(received) => {
            let messages = received
                .into_iter()
                .map(|(token, stored)| deferred_reply_entry(token, stored, req.now))
                .collect();
            Ok(Reply::ok(map_of(vec![("messages", Value::List(messages))])))
        }
        Err(DeferredError::SessionLockLost) => Err(lock_error(LockError::SessionLockLost)),
        Err(DeferredError::NotFound(seq)) => Err(Reply::error(
            404,
            wire::ERR_MESSAGE_NOT_FOUND,
            format!(
                "Failed to lock one or more specified messages. Either the message is not deferred or it does not exist. Sequence number: {seq}."
            ),
        )),
    }
}

fn update_disposition(req: &Request<'_>) -> Result<Reply, Reply> {
    let tokens = lock_tokens(req.map)
        .ok_or_else(|| Reply::error(400, wire::ERR_ARGUMENT, "lock-tokens is required"))?;
    let props = properties_to_modify(req.map);
    let settle = match text_field(req.map, "disposition-status").as_deref() {
        Some("completed") => Settle::Complete,
        Some("abandoned") => Settle::Abandon(props),
        Some("defered") => Settle::Defer(props),
        Some("suspended") => Settle::DeadLetter {
            reason: text_field(req.map, "deadletter-reason"),
            description: text_field(req.map, "deadletter-description"),
            properties: props,
        },
        other => {
            return Err(Reply::error(
                400,
                wire::ERR_ARGUMENT,
                format!("disposition-status {other:?} is not one of completed, abandoned, defered, suspended"),
            ))
        }
    };
    for token in tokens {
        req.entity
            .settle_by_token(req.part, token, settle.clone(), req.now)
            .map_err(lock_error)?;
    }
    Ok(Reply::ok(map_of(vec![])))
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
