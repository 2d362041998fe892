//! A projection written in Rust, registered next to the declarative ones of `projections_file`.
//!
//! Build your own projector binary from this file: every subcommand (`repair`, `rebuild`,
//! `reconcile`, `status`, `--check-config`) then knows the Rust projection too.
//!
//! ```sh
//! cargo run -p ordo-projector --example custom_projection -- --config config/projector.toml
//! ```
//!
//! The version guard, gap filling, dead-lettering and blocking are the engine's: a projection
//! only says which events it selects and how one event changes one document. An `Err` from
//! `apply` is a poison event: dead-lettered, its aggregate blocked until `repair`.

use std::process::ExitCode;
use std::sync::Arc;

use mongodb::bson::{Bson, Document};
use ordo_projection::{ApplyError, Projection};

/// Keeps `order_totals`: per order, the sum of its lines in cents and the number of lines.
#[derive(Debug)]
struct OrderTotals;

impl Projection for OrderTotals {
    fn name(&self) -> &str {
        "order_totals"
    }

    fn collection(&self) -> &str {
        "order_totals"
    }

    fn selects(&self, aggregate_type: Option<&str>, _event_type: &str) -> bool {
        aggregate_type == Some("Order")
    }

    fn apply(&self, doc: &mut Option<Document>, event: &Document) -> Result<(), ApplyError> {
        let refuse = |message: String| ApplyError {
            projection: self.name().to_string(),
            event_type: event.get_str("eventType").unwrap_or_default().to_string(),
            event_id: ordo_projection::event_version(event),
            message,
        };
        match event.get_str("eventType").unwrap_or_default() {
            "OrderLineAdded" => {
                let payload = event.get_document("payload").ok();
                let cents = match payload.and_then(|p| p.get("amountCents")) {
                    Some(Bson::Int32(v)) => i64::from(*v),
                    Some(Bson::Int64(v)) => *v,
                    other => {
                        return Err(refuse(format!(
                            "payload.amountCents must be an integer, found {other:?}"
                        )))
                    }
                };
                let d = doc.get_or_insert_with(Document::new);
                let total = d.get_i64("totalCents").unwrap_or(0);
                let lines = d.get_i64("lines").unwrap_or(0);
                d.insert("totalCents", total + cents);
                d.insert("lines", lines + 1);
            }
            // A cancelled order leaves a tombstone; readers filter `_deleted`.
            "OrderCancelled" => *doc = None,
            // Other order events only advance the version.
            _ => {}
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    ordo_projector::cli::main_with(vec![Arc::new(OrderTotals)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;
    use ordo_projection::fold_history;
    use ordo_projector::ProjectorConfig;

    fn event(v: i64, event_type: &str, payload: Document) -> Document {
        doc! { "aggregateId": "o-1", "aggregateType": "Order", "eventId": v,
        "eventType": event_type, "payload": payload }
    }

    #[test]
    fn folds_like_any_projection_and_refuses_a_bad_amount_as_poison() {
        let history = [
            event(1, "OrderPlaced", doc! {}),
            event(2, "OrderLineAdded", doc! {"amountCents": 250}),
            event(3, "OrderLineAdded", doc! {"amountCents": 1_000_i64}),
        ];
        let model = fold_history(&OrderTotals, "o-1", &history).unwrap();
        assert_eq!(model.version, 3);
        assert_eq!(
            model.doc,
            Some(doc! {"totalCents": 1_250_i64, "lines": 2_i64})
        );
        let bad = [
            event(1, "OrderPlaced", doc! {}),
            event(2, "OrderLineAdded", doc! {"amountCents": "12"}),
        ];
        let err = fold_history(&OrderTotals, "o-1", &bad).unwrap_err();
        assert!(
            err.to_string().contains("payload.amountCents") && err.to_string().contains("v2"),
            "{err}"
        );
    }

    fn config(projections: &str) -> (tempfile::TempDir, ProjectorConfig) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("projections.toml");
        std::fs::write(&file, projections).unwrap();
        let mut cfg = ProjectorConfig::default();
        cfg.projector.projections_file = file;
        (dir, cfg)
    }

    #[test]
    fn is_registered_next_to_the_declarative_projections() {
        let (_dir, cfg) = config(
            r#"
[[projections]]
name = "users"
collection = "users"
[[projections.on.UserRegistered]]
set = { email = "$payload.email" }
"#,
        );
        let all = ordo_projector::load_projections_with(&cfg, vec![Arc::new(OrderTotals)]).unwrap();
        let names: Vec<&str> = all.iter().map(|p| p.name()).collect();
        assert_eq!(names, ["users", "order_totals"]);

        let (_dir, only_rust) = config("");
        let all = ordo_projector::load_projections_with(&only_rust, vec![Arc::new(OrderTotals)])
            .expect("with a Rust projection the file may define none");
        assert_eq!(all.len(), 1);
        assert!(ordo_projector::load_projections_with(&only_rust, Vec::new()).is_err());
    }

    #[test]
    fn a_name_or_collection_taken_by_a_declarative_projection_is_refused() {
        for (name, collection) in [("order_totals", "other"), ("other", "order_totals")] {
            let (_dir, cfg) = config(&format!(
                r#"
[[projections]]
name = "{name}"
collection = "{collection}"
[[projections.on.OrderPlaced]]
set = {{ placed = true }}
"#
            ));
            let err = ordo_projector::load_projections_with(&cfg, vec![Arc::new(OrderTotals)])
                .unwrap_err();
            assert!(
                format!("{err:#}").contains("order_totals"),
                "{name}/{collection}: {err:#}"
            );
        }
    }
}
