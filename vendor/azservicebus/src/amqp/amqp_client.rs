use std::{marker::PhantomData, sync::Arc, time::Duration};


use azure_core::http::Url;
use tokio::sync::Mutex;

use crate::{
    authorization::service_bus_token_credential::ServiceBusTokenCredential,
    constants::DEFAULT_LAST_PEEKED_SEQUENCE_NUMBER,
    core::{TransportClient, TransportConnectionScope},
    primitives::{
        service_bus_retry_options::ServiceBusRetryOptions,
        service_bus_retry_policy::ServiceBusRetryPolicyExt,
        service_bus_transport_type::ServiceBusTransportType,
    },
    receiver::service_bus_receive_mode::ServiceBusReceiveMode,
    sealed::Sealed,
    ServiceBusRetryPolicy,
};

use super::{
    amqp_connection_scope::{AmqpConnectionScope, LinkContext, ReceiverType},
    amqp_session::AmqpSession,
    amqp_receiver::AmqpReceiver,
    amqp_rule_manager::AmqpRuleManager,
    amqp_sender::AmqpSender,
    amqp_session_receiver::AmqpSessionReceiver,
    error::{AmqpClientError, OpenReceiverError, OpenRuleManagerError, OpenSenderError},
};

/// A transport client abstraction responsible for brokering operations for AMQP-based connections.
///
/// See also [`TransportClient`]
#[derive(Debug)]
pub struct AmqpClient<RP> {
    /// The endpoint for the Service Bus service to which the scope is associated.
    service_endpoint: Arc<Url>,

    /// The AMQP connection scope responsible for managing transport constructs for this instance.
    ///
    /// There isn't much read operations on this so it's fine to use a Mutex.
    connection_scope: Arc<Mutex<AmqpConnectionScope>>,

    /// Keep a copy of the transport type to avoid having to lock the connection_scope
    transport_type: ServiceBusTransportType,

    /// Retry policy phantom
    retry_policy: PhantomData<RP>,

    /// Keep track of whether the client has been disposed.
    ///
    /// this is duplicated as the connection scope also keeps track of that. The reason is that
    /// the connection scope is shared between the client and the receivers/senders. The client
    /// shouldn't have to .await for a lock on the connection scope to check if it's been disposed.
    is_connection_scope_disposed: bool,
}

impl<RP> AmqpClient<RP> {
    async fn create_transport_client_inner(
        service_endpoint: Url,
        connection_endpoint: Url,
        credential: ServiceBusTokenCredential,
        transport_type: ServiceBusTransportType,
        retry_timeout: Duration,
    ) -> Result<Self, AmqpClientError> {
        // Create AmqpConnectionScope
        let fut = AmqpConnectionScope::new(
            &service_endpoint,
            connection_endpoint,
            credential,
            transport_type,
        );
        let connection_scope = crate::util::time::timeout(retry_timeout, fut).await??;
    
        Ok(Self {
            service_endpoint: Arc::new(service_endpoint),
            connection_scope: Arc::new(Mutex::new(connection_scope)),
            transport_type,
            retry_policy: PhantomData,
            is_connection_scope_disposed: false,
        })
    }
}

impl<RP> AmqpClient<RP> {
    /// ordo patch (vendor/README.md): a handle that accepts sessions on this client's
    /// connection through `&self`.
    pub(crate) fn session_acceptor(&self) -> AmqpSessionAcceptor<RP> {
        AmqpSessionAcceptor {
            service_endpoint: self.service_endpoint.clone(),
            connection_scope: self.connection_scope.clone(),
            retry_policy: PhantomData,
        }
    }
}

/// ordo patch (vendor/README.md): opens session receivers on a client's connection, each on an
/// AMQP session of its own, holding the connection scope only to begin that session. Accepts
/// on one connection then run side by side instead of one at a time: an accept-next-session
/// can wait at the broker for up to its timeout, and every accept costs round trips (two CBS
/// requests, three attaches) that used to hold the whole connection.
#[derive(Debug)]
pub struct AmqpSessionAcceptor<RP> {
    service_endpoint: Arc<Url>,
    connection_scope: Arc<Mutex<AmqpConnectionScope>>,
    retry_policy: PhantomData<RP>,
}

impl<RP> Clone for AmqpSessionAcceptor<RP> {
    fn clone(&self) -> Self {
        Self {
            service_endpoint: self.service_endpoint.clone(),
            connection_scope: self.connection_scope.clone(),
            retry_policy: PhantomData,
        }
    }
}

impl<RP> AmqpSessionAcceptor<RP>
where
    RP: ServiceBusRetryPolicyExt + Send + Sync + 'static,
{
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn create_session_receiver(
        &self,
        entity_path: String,
        identifier: String,
        retry_options: ServiceBusRetryOptions,
        receive_mode: ServiceBusReceiveMode,
        session_id: Option<String>,
        prefetch_count: u32,
        accept_timeout: Option<std::time::Duration>,
    ) -> Result<AmqpSessionReceiver, OpenReceiverError> {
        let receiver_type = || ReceiverType::Session {
            session_id: session_id.clone(),
            accept_timeout,
        };
        let open = |reuse| {
            self.open_links(&entity_path, &identifier, &receive_mode, receiver_type(), prefetch_count, reuse)
        };
        // A token reused from the connection may have lapsed at the broker before the client
        // expected (a broker that shortens tokens): such a refusal is retried once with tokens
        // of the link's own.
        let (link_session, link_identifier, receiver, cbs_command_sender, link_context) =
            match open(true).await {
                Err(err) if is_unauthorized(&err) => open(false).await?,
                other => other?,
            };
        let retry_policy = RP::from(retry_options);
        let inner = AmqpReceiver {
            id: link_identifier,
            service_endpoint: self.service_endpoint.clone(),
            entity_path,
            identifier_str: identifier,
            retry_policy: Box::new(retry_policy) as Box<dyn ServiceBusRetryPolicy>,
            receiver,
            receive_mode,
            _is_processor: false,
            prefetch_count,
            management_link: None,
            request_response_locked_messages: Default::default(),
            last_peeked_sequence_number: DEFAULT_LAST_PEEKED_SEQUENCE_NUMBER,
            cbs_command_sender,
            connection_scope: self.connection_scope.clone(),
            link_session: Some(link_session),
            link_context: Some(link_context),
        };

        Ok(AmqpSessionReceiver { inner })
    }

    /// Begins the receiver's AMQP session and opens its receiver link on it; the `$management`
    /// link is attached on the same session at its first request, with the returned context.
    #[allow(clippy::type_complexity)]
    async fn open_links(
        &self,
        entity_path: &str,
        identifier: &str,
        receive_mode: &ServiceBusReceiveMode,
        receiver_type: ReceiverType,
        prefetch_count: u32,
        reuse_tokens: bool,
    ) -> Result<
        (
            AmqpSession,
            u32,
            fe2o3_amqp::Receiver,
            tokio::sync::mpsc::Sender<super::amqp_cbs_link::Command>,
            LinkContext,
        ),
        OpenReceiverError,
    > {
        let (opener, context) = self.connection_scope.lock().await.link_session_parts()?;
        let context = context.reusing_tokens(reuse_tokens);
        // ordo patch (vendor/README.md): on an AMQP session a closed receiver left, if there
        // is one; a new one when none is idle, or when the one taken ended under the attach.
        let mut idle = context.idle_sessions().take();
        loop {
            let reused = idle.is_some();
            let mut link_session = match idle.take() {
                Some(session) => session,
                None => AmqpSession::new(
                    fe2o3_amqp::Session::builder()
                        .begin_with(&opener)
                        .await
                        .map_err(OpenReceiverError::Begin)?,
                ),
            };
            let opened = context
                .open_receiver_link(
                    &mut link_session,
                    &self.service_endpoint,
                    entity_path,
                    identifier,
                    receive_mode,
                    receiver_type.clone(),
                    prefetch_count,
                )
                .await;
            match opened {
                Ok((link_identifier, receiver, cbs_command_sender)) => {
                    return Ok((link_session, link_identifier, receiver, cbs_command_sender, context))
                }
                Err(_) if reused && link_session.handle.is_ended() => continue,
                Err(err) => {
                    // A refused link (no session available, most often) leaves its AMQP
                    // session as it was.
                    context.idle_sessions().put(link_session);
                    return Err(err);
                }
            }
        }
    }
}

/// ordo patch (vendor/README.md): whether the broker refused a link for want of authorization.
fn is_unauthorized(err: &OpenReceiverError) -> bool {
    use fe2o3_amqp::link::{ReceiverAttachError, SenderAttachError};
    use fe2o3_amqp_management::error::AttachError;
    use fe2o3_amqp_types::definitions::{AmqpError, ErrorCondition};

    let error = match err {
        OpenReceiverError::ReceiverAttach(ReceiverAttachError::RemoteClosedWithError(e))
        | OpenReceiverError::ManagementLinkAttach(AttachError::Receiver(
            ReceiverAttachError::RemoteClosedWithError(e),
        ))
        | OpenReceiverError::ManagementLinkAttach(AttachError::Sender(
            SenderAttachError::RemoteClosedWithError(e),
        )) => e,
        _ => return false,
    };
    matches!(
        error.condition,
        ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess)
    )
}

impl<RP> Sealed for AmqpClient<RP> {}

impl<RP> TransportClient for AmqpClient<RP>
where
    RP: ServiceBusRetryPolicyExt + Send + Sync + 'static,
{
    type CreateClientError = AmqpClientError;
    type CreateSenderError = OpenSenderError;
    type CreateReceiverError = OpenReceiverError;
    type CreateRuleManagerError = OpenRuleManagerError;
    type DisposeError = AmqpClientError;

    type Sender = AmqpSender;
    type Receiver = AmqpReceiver;
    type SessionReceiver = AmqpSessionReceiver;
    type RuleManager = AmqpRuleManager;

    async fn create_transport_client(
        host: &str,
        credential: ServiceBusTokenCredential,
        transport_type: ServiceBusTransportType,
        custom_endpoint: Option<Url>,
        retry_timeout: Duration,
    ) -> Result<Self, Self::CreateClientError> {
        // Scheme of service endpoint must always be either "amqp" or "amqps"
        let service_endpoint = format_service_endpoint(host)?;

        let connection_endpoint = format_connection_endpoint(host, transport_type, custom_endpoint, &service_endpoint)?;

        Self::create_transport_client_inner(
            service_endpoint,
            connection_endpoint,
            credential,
            transport_type,
            retry_timeout,
        ).await
    }

    cfg_unsecured! {
        async fn create_unsecured_transport_client(
            host: &str,
            credential: ServiceBusTokenCredential,
            transport_type: ServiceBusTransportType,
            custom_endpoint: Option<Url>,
            retry_timeout: Duration,
        ) -> Result<Self, Self::CreateClientError> {
            // Scheme of service endpoint must always be either "amqp" or "amqps"
            let service_endpoint = format_unsecured_service_endpoint(host)?;

            let connection_endpoint = format_unsecured_connection_endpoint(host, transport_type, custom_endpoint, &service_endpoint)?;

            Self::create_transport_client_inner(
                service_endpoint,
                connection_endpoint,
                credential,
                transport_type,
                retry_timeout,
            ).await
        }
    }

    fn transport_type(&self) -> ServiceBusTransportType {
        // `transport_type` is a simple enum, cloning should be cheap
        self.transport_type
    }

    fn is_closed(&self) -> bool {
        self.is_connection_scope_disposed
    }

    async fn create_sender(
        &mut self,
        entity_path: String,
        identifier: String,
        retry_options: ServiceBusRetryOptions,
    ) -> Result<Self::Sender, Self::CreateSenderError> {
        let mut connection_scope = self.connection_scope.lock().await;

        let (link_identifier, sender, cbs_command_sender) = connection_scope
            .open_sender_link(&self.service_endpoint, &entity_path, &identifier)
            .await?;
        let management_link = connection_scope
            .open_management_link(&self.service_endpoint, &entity_path, &identifier)
            .await?;
        let retry_policy = RP::from(retry_options);
        Ok(AmqpSender {
            id: link_identifier,
            service_endpoint: self.service_endpoint.clone(),
            entity_path,
            identifier_str: identifier,
            retry_policy: Box::new(retry_policy) as Box<dyn ServiceBusRetryPolicy>,
            sender,
            management_link,
            cbs_command_sender,
            connection_scope: self.connection_scope.clone(),
        })
    }

    async fn create_receiver(
        &mut self,
        entity_path: String,
        identifier: String,
        retry_options: ServiceBusRetryOptions,
        receive_mode: ServiceBusReceiveMode,
        prefetch_count: u32,
    ) -> Result<Self::Receiver, Self::CreateReceiverError> {
        let mut connection_scope = self.connection_scope.lock().await;

        let (link_identifier, receiver, cbs_command_sender) = connection_scope
            .open_receiver_link(
                &self.service_endpoint,
                &entity_path,
                &identifier,
                &receive_mode,
                ReceiverType::NonSession,
                prefetch_count,
            )
            .await?;
        let management_link = connection_scope
            .open_management_link(&self.service_endpoint, &entity_path, &identifier)
            .await?;
        let retry_policy = RP::from(retry_options);
        Ok(AmqpReceiver {
            id: link_identifier,
            service_endpoint: self.service_endpoint.clone(),
            entity_path,
            identifier_str: identifier,
            retry_policy: Box::new(retry_policy) as Box<dyn ServiceBusRetryPolicy>,
            receiver,
            receive_mode,
            _is_processor: false,
            prefetch_count,
            management_link: Some(management_link),
            request_response_locked_messages: Default::default(),
            last_peeked_sequence_number: DEFAULT_LAST_PEEKED_SEQUENCE_NUMBER,
            cbs_command_sender,
            connection_scope: self.connection_scope.clone(),
            link_session: None,
            link_context: None,
        })
    }

    async fn create_session_receiver(
        &mut self,
        entity_path: String,
        identifier: String,
        retry_options: ServiceBusRetryOptions,
        receive_mode: ServiceBusReceiveMode,
        session_id: Option<String>,
        prefetch_count: u32,
        accept_timeout: Option<std::time::Duration>, // ordo patch (vendor/README.md)
    ) -> Result<Self::SessionReceiver, Self::CreateReceiverError> {
        self.session_acceptor()
            .create_session_receiver(
                entity_path,
                identifier,
                retry_options,
                receive_mode,
                session_id,
                prefetch_count,
                accept_timeout,
            )
            .await
    }

    async fn create_rule_manager(
        &mut self,
        subscription_path: String,
        identifier: String,
        retry_options: ServiceBusRetryOptions,
    ) -> Result<Self::RuleManager, Self::CreateRuleManagerError> {
        let mut connection_scope = self.connection_scope.lock().await;
        let retry_policy = RP::from(retry_options);
        let management_link = connection_scope
            .open_management_link(&self.service_endpoint, &subscription_path, &identifier)
            .await?;
        Ok(AmqpRuleManager {
            identifier_str: identifier,
            service_endpoint: self.service_endpoint.clone(),
            subscription_path,
            retry_policy: Box::new(retry_policy) as Box<dyn ServiceBusRetryPolicy>,
            management_link,
            connection_scope: self.connection_scope.clone(),
        })
    }

    async fn close(&mut self) -> Result<(), Self::DisposeError> {
        if self.is_connection_scope_disposed {
            Ok(())
        } else {
            self.is_connection_scope_disposed = true;
            self.connection_scope
                .lock()
                .await
                .dispose()
                .await
                .map_err(Into::into)
        }
    }
}

fn format_service_endpoint(host: &str) -> Result<Url, url::ParseError> {
    let addr = format!("{}://{}", ServiceBusTransportType::AMQP_SCHEME, host);
    Url::parse(&addr)
}

cfg_unsecured! {
    fn format_unsecured_service_endpoint(host: &str) -> Result<Url, url::ParseError> {
        let addr = format!("{}://{}", ServiceBusTransportType::UNSECURED_AMQP_SCHEME, host);
        Url::parse(&addr)
    }
}

macro_rules! format_connection_endpoint_impl {
    ($host:ident, $transport_type:ident, $custom_endpoint:ident, $service_endpoint:ident, $url_scheme_fn:ident) => {
        match $custom_endpoint.as_ref().and_then(|url| url.host_str()) {
            Some(custom_host) => match $transport_type {
                #[cfg(not(target_arch = "wasm32"))]
                ServiceBusTransportType::AmqpTcp => {
                    let addr = format!("{}://{}", $transport_type.$url_scheme_fn(), custom_host);
                    Url::parse(&addr)
                }
                ServiceBusTransportType::AmqpWebSocket => {
                    let addr = format!(
                        "{}://{}{}",
                        $transport_type.$url_scheme_fn(),
                        custom_host,
                        AmqpConnectionScope::WEB_SOCKETS_PATH_SUFFIX
                    );
                    Url::parse(&addr)
                }
            },
            None => match $transport_type {
                #[cfg(not(target_arch = "wasm32"))]
                ServiceBusTransportType::AmqpTcp => Ok($service_endpoint.clone()),
                ServiceBusTransportType::AmqpWebSocket => {
                    let addr = format!(
                        "{}://{}{}",
                        $transport_type.$url_scheme_fn(),
                        $host,
                        AmqpConnectionScope::WEB_SOCKETS_PATH_SUFFIX
                    );
                    Url::parse(&addr)
                }
            },
        }
    };
}

#[cfg_attr(target_arch = "wasm32", allow(unused_variables))]
fn format_connection_endpoint(
    host: &str,
    transport_type: ServiceBusTransportType,
    custom_endpoint: Option<Url>,
    service_endpoint: &Url,
) -> Result<Url, url::ParseError> {
    format_connection_endpoint_impl!(host, transport_type, custom_endpoint, service_endpoint, url_scheme)
}

cfg_unsecured! {
    fn format_unsecured_connection_endpoint(
        host: &str,
        transport_type: ServiceBusTransportType,
        custom_endpoint: Option<Url>,
        service_endpoint: &Url,
    ) -> Result<Url, url::ParseError> {
        format_connection_endpoint_impl!(host, transport_type, custom_endpoint, service_endpoint, unsecured_url_scheme)
    }
}

#[cfg(test)]
mod tests {}
