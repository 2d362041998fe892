//! SASL: ANONYMOUS (what Service Bus clients use before CBS) and PLAIN with the namespace key.

use std::sync::Arc;

use fe2o3_amqp::acceptor::{sasl_acceptor::SaslServerFrame, SaslAcceptor};
use fe2o3_amqp_types::{
    primitives::{Array, Symbol},
    sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse},
};

/// Offers ANONYMOUS and PLAIN; PLAIN must present the namespace key name and key.
#[derive(Debug, Clone)]
pub(crate) struct Mechanisms {
    key_name: Arc<str>,
    key: Arc<str>,
}

impl Mechanisms {
    pub(crate) fn new(key_name: &str, key: &str) -> Self {
        Self {
            key_name: Arc::from(key_name),
            key: Arc::from(key),
        }
    }

    fn check_plain(&self, response: &[u8]) -> SaslCode {
        let mut parts = response.split(|b| *b == 0);
        let _authzid = parts.next();
        match (parts.next(), parts.next()) {
            (Some(user), Some(pass))
                if user == self.key_name.as_bytes() && pass == self.key.as_bytes() =>
            {
                SaslCode::Ok
            }
            _ => SaslCode::Auth,
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
        Array::from(vec![Symbol::from("ANONYMOUS"), Symbol::from("PLAIN")])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        match init.mechanism.as_str() {
            "ANONYMOUS" => outcome(SaslCode::Ok),
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
