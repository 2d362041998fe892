//! Request/response nodes: `$cbs` (put-token) and each entity's `$management` (whose
//! operations live in `management`).
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
    messaging::{AmqpValue, ApplicationProperties, Body, Message, Properties},
    performatives::Attach,
    primitives::{OrderedMap, SimpleValue, Symbol, Value},
};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, warn};

use super::ConnCtx;
use crate::{
    store::{AmqpMessage, Entity, Part},
    wire,
};

/// How long a request waits for its reply link to be attached.
const REPLY_ROUTE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

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
    name: String,
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
    /// The reply link a request's answer goes to: the one the request's `reply-to` names, by
    /// its target address, as Service Bus's request/response guide has it ("my response link
    /// unique address"), or by its link name, which is all Microsoft's JavaScript `$cbs` client
    /// gives (a reply link with no target, named after its `reply-to`). A `reply-to` that names
    /// no link yet waits for it (`wait_for`): the link may still be attaching, and on a
    /// session that many `$management` clients share, an answer sent to another client's link
    /// left its caller waiting for its timeout. Only a request without `reply-to` goes to the
    /// newest reply link of its node.
    fn find(&self, reply_to: Option<&str>, node: &str) -> Option<mpsc::Sender<AmqpMessage>> {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let route = match reply_to {
            Some(r) => routes
                .iter()
                .find(|route| route.target.as_deref() == Some(r) || route.name == r),
            None => routes.iter().rev().find(|route| route.node == node),
        };
        route.map(|route| route.tx.clone())
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
    let name = attach.name.clone();
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
                    name,
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
    loop {
        let delivery = tokio::select! {
            d = receiver.recv::<Body<Value>>() => d,
            _ = ctx.cancel.cancelled() => return,
        };
        let Ok(delivery) = delivery else { return };
        let (info, request) = delivery.into_parts();
        // The client reads the reply only after the request's outcome; it waits in its link
        // buffer meanwhile.
        if receiver.accept(info).await.is_err() {
            return;
        }
        let reply = match &node {
            Node::Cbs => put_token(&request, &ctx),
            Node::Management { entity, part, path } => {
                super::management::answer(&request, entity.as_deref(), *part, path, &ctx)
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
pub(super) struct Reply {
    pub(super) status: i32,
    pub(super) description: String,
    pub(super) condition: Option<&'static str>,
    pub(super) body: Value,
}

impl Reply {
    pub(super) fn ok(body: Value) -> Self {
        Self {
            status: 200,
            description: "OK".into(),
            condition: None,
            body,
        }
    }

    pub(super) fn error(
        status: i32,
        condition: &'static str,
        description: impl Into<String>,
    ) -> Self {
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

pub(super) fn app_text<'a>(request: &'a AmqpMessage, name: &str) -> Option<&'a str> {
    match request.application_properties.as_ref()?.0.get(name)? {
        SimpleValue::String(s) => Some(s.as_str()),
        SimpleValue::Symbol(s) => Some(s.as_str()),
        _ => None,
    }
}

/// CBS put-token: the token (a SAS token, or a JWT of the configured Entra issuer) is verified
/// (see `auth`) and kept for the connection's links, answered with the 202 every Service Bus client checks for, or 401
/// with the reason. With `require_authorization = false` every token gets 202.
fn put_token(request: &AmqpMessage, ctx: &ConnCtx) -> Reply {
    if app_text(request, "operation") != Some("put-token") {
        return Reply::error(
            400,
            wire::ERR_NOT_IMPLEMENTED,
            format!(
                "unsupported $cbs operation {:?}",
                app_text(request, "operation")
            ),
        );
    }
    let accepted = Reply {
        status: 202,
        description: "Accepted".into(),
        condition: None,
        body: Value::Null,
    };
    if !ctx.shared.config.namespace.require_authorization {
        return accepted;
    }
    let token = match &request.body {
        Body::Value(AmqpValue(Value::String(t))) => t.as_str(),
        _ => "",
    };
    let name = app_text(request, "name").unwrap_or_default();
    let now = crate::clock::now_ms();
    // The token's own form decides, not the `type` property: Microsoft's Python SDK (pyamqp)
    // puts SAS tokens with type "jwt", and Service Bus takes them.
    let jwt =
        app_text(request, "type") == Some("jwt") && !token.starts_with(crate::auth::SAS_PREFIX);
    let verified = if !jwt {
        crate::auth::verify(token, name, &ctx.shared.keys(), now)
    } else {
        crate::auth::verify_jwt(token, ctx.shared.issuer.as_ref(), now)
    };
    match verified {
        Ok(grant) => {
            let grant = match ctx.shared.config.namespace.max_token_lifetime {
                Some(max) => grant.expiring_by(now.saturating_add(max.as_millis() as i64)),
                None => grant,
            };
            ctx.auth.put(grant);
            ctx.shared
                .tokens_put
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            accepted
        }
        Err(denied) => {
            debug!(connection = ctx.id, reason = %denied.0, "put-token refused");
            Reply {
                status: 401,
                description: denied.0,
                condition: Some(wire::ERR_UNAUTHORIZED),
                body: Value::Null,
            }
        }
    }
}
