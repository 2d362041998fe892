use fe2o3_amqp::link::DetachError;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::time::Duration as StdDuration;

use fe2o3_amqp_cbs::{client::CbsClient, AsyncCbsTokenProvider};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::util::time::{DelayQueue, Key};

use super::error::AmqpCbsEventLoopStopped;
use super::{cbs_token_provider::CbsTokenProvider, error::CbsAuthError};

const DELAY_QUEUE_PLACEHOLDER_REFRESH_DURATION: StdDuration = StdDuration::from_secs(30 * 60);
const CBS_LINK_COMMAND_QUEUE_SIZE: usize = 128;
/// ordo patch (vendor/README.md): a token already put on the connection for an audience and
/// its claims is reused for another link while it stays valid for at least this long.
const TOKEN_REUSE_MARGIN: StdDuration = StdDuration::from_secs(10 * 60);

// This is a monotonically incrementing identifier that is assigned when a new link is created.
type LinkIdentifier = u32;

pub(crate) enum Command {
    NewAuthorizationRefresher {
        auth: AuthorizationRefresher,
        result_sender: oneshot::Sender<Result<(), CbsAuthError>>,
        /// ordo patch (vendor/README.md): whether a token already put for the same audience
        /// and claims may serve (see `AmqpCbsLink::authorize`).
        reuse: bool,
    },
    RemoveAuthorizationRefresher(LinkIdentifier),
}

pub(crate) enum Refresher {
    /// This is a placeholder that is only used to avoid spinning the runtime when the
    /// delay queue is exhausted.
    Placeholder,
    Authorization(AuthorizationRefresher),
}

pub(crate) struct AuthorizationRefresher {
    link_identifier: LinkIdentifier,
    endpoint: String,
    resource: String,
    required_claims: Vec<String>,
}

pub(crate) struct AmqpCbsLinkHandle {
    command_sender: mpsc::Sender<Command>,
    stop_sender: CancellationToken,
    join_handle: JoinHandle<Result<(), DetachError>>,
}

impl AmqpCbsLinkHandle {
    pub(crate) fn command_sender(&self) -> &mpsc::Sender<Command> {
        &self.command_sender
    }

    pub(crate) fn stop(&self) {
        self.stop_sender.cancel();
    }

    pub(crate) fn join_handle_mut(&mut self) -> &mut JoinHandle<Result<(), DetachError>> {
        &mut self.join_handle
    }
}

/// Authorizes link `link_identifier` through the CBS task behind `command_sender` and keeps its
/// token refreshed; with `reuse`, a token already put for the same audience and claims may
/// serve (ordo patch, vendor/README.md: a free function, so a caller holding only the command
/// sender can use it).
pub(crate) async fn request_refreshable_authorization(
    command_sender: &mpsc::Sender<Command>,
    link_identifier: u32,
    endpoint: String,
    resource: String,
    required_claims: Vec<String>,
    reuse: bool,
) -> Result<Result<(), CbsAuthError>, AmqpCbsEventLoopStopped> {
    let auth = AuthorizationRefresher {
        link_identifier,
        endpoint,
        resource,
        required_claims,
    };
    let (result_sender, result) = oneshot::channel();
    let command = Command::NewAuthorizationRefresher {
        auth,
        result_sender,
        reuse,
    };
    command_sender
        .send(command)
        .await
        .map_err(|_| AmqpCbsEventLoopStopped {})?;
    result.await.map_err(|_| AmqpCbsEventLoopStopped {})
}

pub(crate) struct AmqpCbsLink {
    pub stop: CancellationToken,
    pub commands: mpsc::Receiver<Command>,
    pub active_link_identifiers: HashMap<LinkIdentifier, Key>,
    pub delay_queue: DelayQueue<Refresher>,
    pub cbs_token_provider: CbsTokenProvider,
    pub cbs_client: CbsClient,
    /// ordo patch (vendor/README.md): until when the token put on this connection for an
    /// audience (resource) and its claims is valid.
    pub authorized: HashMap<(String, Vec<String>), crate::util::time::Instant>,
}

impl AmqpCbsLink {
    pub(crate) fn new(
        cbs_token_provider: CbsTokenProvider,
        cbs_client: CbsClient,
        commands: mpsc::Receiver<Command>,
        stop: CancellationToken,
    ) -> Self {
        let mut delay_queue = DelayQueue::new();
        delay_queue.insert(
            Refresher::Placeholder,
            DELAY_QUEUE_PLACEHOLDER_REFRESH_DURATION,
        );

        AmqpCbsLink {
            stop,
            commands,
            active_link_identifiers: HashMap::new(),
            delay_queue,
            cbs_token_provider,
            cbs_client,
            authorized: HashMap::new(),
        }
    }

    cfg_not_wasm32! {
        pub(crate) fn spawn(
            cbs_token_provider: CbsTokenProvider,
            cbs_client: CbsClient,
        ) -> AmqpCbsLinkHandle {
            let (command_sender, commands) = mpsc::channel(CBS_LINK_COMMAND_QUEUE_SIZE);
            let stop_sender = CancellationToken::new();
            let stop = stop_sender.child_token();
            let amqp_cbs_link = AmqpCbsLink::new(cbs_token_provider, cbs_client, commands, stop);

            let join_handle = tokio::spawn(amqp_cbs_link.event_loop());
            AmqpCbsLinkHandle {
                command_sender,
                stop_sender,
                join_handle,
            }
        }
    }

    cfg_wasm32! {
        pub(crate) fn spawn_local(
            cbs_token_provider: CbsTokenProvider,
            cbs_client: CbsClient,
        ) -> AmqpCbsLinkHandle {
            let (command_sender, commands) = mpsc::channel(CBS_LINK_COMMAND_QUEUE_SIZE);
            let stop_sender = CancellationToken::new();
            let stop = stop_sender.child_token();
            let amqp_cbs_link = AmqpCbsLink::new(cbs_token_provider, cbs_client, commands, stop);

            let join_handle = tokio::task::spawn_local(amqp_cbs_link.event_loop());
            AmqpCbsLinkHandle {
                command_sender,
                stop_sender,
                join_handle,
            }
        }
    }

    async fn request_authorization_using_cbs(
        &mut self,
        endpoint: impl AsRef<str>,
        resource: impl AsRef<str>,
        required_claims: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> Result<Option<crate::util::time::Instant>, CbsAuthError> {
        let resource = resource.as_ref();
        let token = self
            .cbs_token_provider
            .get_token_async(endpoint, resource, required_claims)
            .await?;

        // find the smallest timeout
        let expires_at_utc = token.expires_at_utc().clone().map(OffsetDateTime::from);

        // TODO: Is there any way to convert directly from OffsetDateTime/Timestamp to StdInstant?
        let expires_at_instant = expires_at_utc.map(|expires_at| {
            let now_instant = crate::util::time::Instant::now();
            let now = crate::util::time::now_utc(); // TODO: is there any way to convert instant to datetime?
            let timespan = expires_at - now;
            now_instant + timespan.unsigned_abs()
        });

        self.cbs_client.put_token(resource, token).await?;

        Ok(expires_at_instant)
    }

    /// ordo patch (vendor/README.md): authorizes `auth`'s link. A token put on this connection
    /// for the same audience and claims covers every link to it until it expires, so while one
    /// stays valid for [`TOKEN_REUSE_MARGIN`] no new one is put: the put-token round trip went
    /// with every link, and the links of every accept on a connection waited for each other's
    /// in this loop. Returns until when the link is authorized, when its refresh is due.
    async fn authorize(
        &mut self,
        auth: &AuthorizationRefresher,
        reuse: bool,
    ) -> Result<Option<crate::util::time::Instant>, CbsAuthError> {
        let key = (auth.resource.clone(), auth.required_claims.clone());
        let now = crate::util::time::Instant::now();
        match self.authorized.get(&key) {
            Some(until) if reuse && *until > now + TOKEN_REUSE_MARGIN => return Ok(Some(*until)),
            _ => {}
        }
        let expires_at = self
            .request_authorization_using_cbs(&auth.endpoint, &auth.resource, &auth.required_claims)
            .await?;
        match expires_at {
            Some(until) => self.authorized.insert(key, until),
            None => self.authorized.remove(&key),
        };
        Ok(expires_at)
    }

    async fn handle_command(&mut self, command: Command) {
        match command {
            Command::NewAuthorizationRefresher {
                auth,
                result_sender,
                reuse,
            } => self.add_refresher(auth, result_sender, reuse).await,
            Command::RemoveAuthorizationRefresher(link_identifier) => {
                let key = self.active_link_identifiers.remove(&link_identifier);
                if let Some(key) = key {
                    self.delay_queue.remove(&key);
                }
            }
        }
    }

    async fn add_refresher(
        &mut self,
        auth: AuthorizationRefresher,
        result_sender: oneshot::Sender<Result<(), CbsAuthError>>,
        reuse: bool,
    ) {
        // First request authorization once, and then schedule a refresh.
        let result = self.authorize(&auth, reuse).await;
        if let Ok(expires_at) = result {
            self.schedule_refresh(auth, expires_at);
        }
        let _ = result_sender.send(result.map(|_| ()));
    }

    /// ordo patch (vendor/README.md): refreshes `auth` at `expires_at`, if that is to come.
    fn schedule_refresh(
        &mut self,
        auth: AuthorizationRefresher,
        expires_at: Option<crate::util::time::Instant>,
    ) {
        if let Some(expires_at) = expires_at {
            if expires_at > crate::util::time::Instant::now() {
                let link_identifier = auth.link_identifier;
                let key = self
                    .delay_queue
                    .insert_at(Refresher::Authorization(auth), expires_at);
                self.active_link_identifiers.insert(link_identifier, key);
            }
        }
    }

    async fn handle_refresher(&mut self, refresher: Refresher) {
        match refresher {
            Refresher::Placeholder => {
                let _key = self.delay_queue.insert(
                    Refresher::Placeholder,
                    DELAY_QUEUE_PLACEHOLDER_REFRESH_DURATION,
                );
            }
            Refresher::Authorization(auth) => {
                // Another link's refresh may have renewed the token a moment ago.
                match self.authorize(&auth, true).await {
                    Ok(expires_at) => self.schedule_refresh(auth, expires_at),
                    Err(err) => {
                        // TODO: log error
                        log::error!("CBS authorization refresh failed: {}", err);
                    }
                }
            }
        }
    }

    pub(crate) async fn event_loop(mut self) -> Result<(), DetachError> {
        loop {
            tokio::select! {
                _stop_cbs_link = self.stop.cancelled() => {
                    return self.cbs_client.close().await
                },
                command = self.commands.recv() => {
                    if let Some(command) = command {
                        self.handle_command(command).await;
                    } else {
                        // All senders including the one held by AmqpConnectionScope have been dropped, so we should stop.
                        return self.cbs_client.close().await
                    }
                },
                refresher = self.delay_queue.next() => {
                    // A `None` is returned if the queue is exhausted. New refresher may still be
                    // added in the future.
                    if let Some(refresher) = refresher {
                        self.handle_refresher(refresher.into_inner()).await;
                    } else {
                        // The delay queue is exhausted. We need to add a placeholder to avoid
                        // spinning the runtime.
                        let _key = self.delay_queue.insert(Refresher::Placeholder, DELAY_QUEUE_PLACEHOLDER_REFRESH_DURATION);
                    }
                }
            }
        }
    }
}
