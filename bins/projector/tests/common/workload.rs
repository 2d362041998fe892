//! The seeded User/Order workload.

use mongodb::bson::{doc, Bson, DateTime, Document};

/// A source event.
pub fn event(agg: &str, agg_type: &str, v: i64, event_type: &str, payload: Document) -> Document {
    doc! {
        "aggregateId": agg, "aggregateType": agg_type, "eventId": v, "eventType": event_type,
        "payload": payload, "timestamp": DateTime::from_millis(1_700_000_000_000 + v * 1000),
    }
}

/// `n` aggregates (even: User, odd: Order) with `per` events each, in publish order
/// (aggregate by aggregate).
pub fn workload(prefix: &str, n: usize, per: i64) -> Vec<Document> {
    let mut out = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        if i % 2 == 0 {
            out.push(event(
                &id,
                "User",
                1,
                "UserRegistered",
                doc! { "email": format!("{id}@x"), "name": id.clone() },
            ));
            for v in 2..=per {
                let e = if v == per && i % 4 == 0 {
                    event(&id, "User", v, "UserDeactivated", doc! {})
                } else {
                    event(
                        &id,
                        "User",
                        v,
                        "UserEmailUpdated",
                        doc! { "email": format!("{id}+{v}@x") },
                    )
                };
                out.push(e);
            }
        } else {
            out.push(event(
                &id,
                "Order",
                1,
                "OrderCreated",
                doc! { "customerId": format!("c{i}") },
            ));
            let mut live: Vec<String> = Vec::new();
            for v in 2..=per {
                let e = if v % 3 == 0 && !live.is_empty() {
                    let sku = live.remove(0);
                    event(&id, "Order", v, "ItemRemovedFromOrder", doc! { "sku": sku })
                } else {
                    let sku = format!("sku{v}");
                    live.push(sku.clone());
                    event(
                        &id,
                        "Order",
                        v,
                        "ItemAddedToOrder",
                        doc! { "sku": sku, "qty": (v % 4) + 1, "price": Bson::Double(9.5) },
                    )
                };
                out.push(e);
            }
        }
    }
    out
}
