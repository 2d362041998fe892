//! SASL: ANONYMOUS (what Service Bus clients use before CBS), MSSBCBS (Service Bus's own name
//! for "authorization follows through CBS", offered by the service) and PLAIN with a key name
//! and key of the namespace, which authorizes the whole connection with that key's rights.

use std::sync::Arc;

use fe2o3_amqp::acceptor::{sasl_acceptor::SaslServerFrame, SaslAcceptor};
use fe2o3_amqp_types::{
    primitives::{Array, Symbol},
    sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse},
};

use crate::auth::{ConnAuth, Keys};

/// The mechanisms of one connection; a PLAIN login is recorded in its [`ConnAuth`].
#[derive(Debug, Clone)]
pub(crate) struct Mechanisms {
    keys: Keys,
    auth: Arc<ConnAuth>,
}

impl Mechanisms {
    pub(crate) fn new(keys: Keys, auth: Arc<ConnAuth>) -> Self {
        Self { keys, auth }
    }

    fn check_plain(&self, response: &[u8]) -> SaslCode {
        let mut parts = response.split(|b| *b == 0);
        let _authzid = parts.next();
        let (Some(user), Some(pass)) = (parts.next(), parts.next()) else {
            return SaslCode::Auth;
        };
        match self.keys.check_plain(user, pass) {
            Some(rights) => {
                self.auth.login(rights);
                SaslCode::Ok
            }
            None => SaslCode::Auth,
        }
    }
}

fn outcome(code: SaslCode) -> SaslServerFrame {
    SaslServerFrame::Outcome(SaslOutcome {
        code,
        additional_data: None,
    })
}

impl SaslAcceptor for Mechanisms {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![
            Symbol::from("ANONYMOUS"),
            Symbol::from("PLAIN"),
            Symbol::from("MSSBCBS"),
        ])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        match init.mechanism.as_str() {
            "ANONYMOUS" | "MSSBCBS" => outcome(SaslCode::Ok),
            "PLAIN" => {
                let response = init
                    .initial_response
                    .map(|b| b.into_vec())
                    .unwrap_or_default();
                outcome(self.check_plain(&response))
            }
            _ => outcome(SaslCode::Auth),
        }
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        outcome(SaslCode::Sys)
    }
}
