//! Applying events: fold them into the aggregate's read models (through gaps filled from the
//! events collection, `gap.rs`) and write each changed model once, guarded by the version it
//! was read at.

use ordo_projection::ApplyError;

use super::session::Held;
use super::{Applied, Engine, Event, WorkError};
use crate::settle::{Poison, Stop, REASON_PROJECTION, REASON_REFUSED};
use crate::store::Written;
use mongodb::bson::Document;
use ordo_core::metrics as m;
use ordo_projection::{selects, Projection, ReadModel};
use std::collections::BTreeMap;

impl Engine {
    /// Folds `events` into every relevant projection and writes each changed model once.
    /// A fault of the events (poison, a refused write) becomes the returned stop; any other
    /// fault is an error, and the caller retries the batch.
    pub(super) async fn apply(
        &self,
        held: &mut Held,
        aggregate_id: &str,
        events: &[&Event],
    ) -> Result<Applied, WorkError> {
        if !self.cfg.apply_delay.is_zero() {
            tokio::time::sleep(self.cfg.apply_delay).await;
        }
        let mut plan = self.plan_batch(held, aggregate_id, events).await?;
        // Phase 2: fold up to the limit and write, reloading on a failed guard.
        for (pi, p) in self.projections.iter().enumerate() {
            self.fold_and_write(held, pi, p.as_ref(), aggregate_id, events, &mut plan)
                .await?;
        }
        Ok(Applied {
            durable: plan.limit,
            base: plan.base,
            stop: plan.stop,
        })
    }

    /// Phase 1: [`plan`](Self::plan), assuming the models of a new aggregate empty. A batch
    /// from v1 starts its aggregate (a new order, a new user): its models are not read first
    /// but created by the write, an insert whose guard catches a model that exists after all (a
    /// redelivery, a rebuild), which is read then. One database round trip less for every new
    /// aggregate.
    async fn plan_batch(
        &self,
        held: &mut Held,
        aggregate_id: &str,
        events: &[&Event],
    ) -> Result<Plan, WorkError> {
        let new_aggregate = events.first().is_some_and(|e| e.version == 1);
        let mut plan = self.plan(held, aggregate_id, events, new_aggregate).await?;
        if plan.stop.is_some() && !plan.assumed.is_empty() {
            // A stop found on a model assumed new may be none on the stored one: read them.
            for pi in std::mem::take(&mut plan.assumed) {
                held.models[pi] = None;
            }
            plan = self.plan(held, aggregate_id, events, false).await?;
        }
        Ok(plan)
    }

    /// Phase 2 for projection `pi`: folds its model up to the plan's limit and writes it,
    /// guarded by the version it was read at; a failed guard reloads the model and folds
    /// again. A model reloaded after a conflict can be older than the one phase 1 folded (a
    /// rebuild, an operator's reset) and stop elsewhere: that stop lowers the limit too, as a
    /// write the server refuses does.
    async fn fold_and_write(
        &self,
        held: &mut Held,
        pi: usize,
        p: &dyn Projection,
        aggregate_id: &str,
        events: &[&Event],
        plan: &mut Plan,
    ) -> Result<(), WorkError> {
        let mut conflicts = 0;
        loop {
            let Some((stored, loaded)) = held.models[pi].clone() else {
                return Ok(());
            };
            let mut model = stored;
            if let Some(s) = self
                .fold(p, &mut model, events, plan.limit, &mut plan.gap_events)
                .await?
            {
                lower(&mut plan.limit, &mut plan.stop, s);
            }
            if !model.needs_write(loaded) {
                held.models[pi] = Some((model, loaded));
                return Ok(());
            }
            match self.store.write(p, &model, loaded).await {
                Ok(Written::Ok) => {
                    let v = model.version;
                    held.models[pi] = Some((model, v));
                    return Ok(());
                }
                Ok(Written::Conflict) => {
                    metrics::counter!(m::GUARD_CONFLICTS).increment(1);
                    conflicts += 1;
                    if conflicts > self.cfg.transient_retry_limit.max(3) {
                        return Err(WorkError::ConflictStorm(conflicts));
                    }
                    let fresh = self.store.load(p, aggregate_id).await?;
                    let v = fresh.version;
                    plan.base = plan.base.max(v);
                    held.models[pi] = Some((fresh, v));
                }
                Err(e) if e.is_refusal() => {
                    tracing::error!(aggregate = %aggregate_id, projection = p.name(), error = %e, "the server refused the read model");
                    let description = format!(
                        "{} of {aggregate_id} up to v{}: {e}",
                        p.collection(),
                        model.version
                    );
                    let refused = stop_at(p, loaded + 1, REASON_REFUSED, description);
                    lower(&mut plan.limit, &mut plan.stop, refused);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Loads the models the batch needs (`assume_new`: takes them as empty instead, and lists
    /// them in [`Plan::assumed`]) and finds where folding must stop (poison, a gap that cannot be filled),
    /// without writing.
    async fn plan(
        &self,
        held: &mut Held,
        aggregate_id: &str,
        events: &[&Event],
        assume_new: bool,
    ) -> Result<Plan, WorkError> {
        let mut plan = Plan {
            limit: 0,
            base: 0,
            stop: None,
            gap_events: BTreeMap::new(),
            assumed: Vec::new(),
        };
        // With no event to apply (the batch starts with a message that cannot be read), every
        // model: what they hold is where that message stands.
        for (pi, p) in self.projections.iter().enumerate() {
            let needed = events.is_empty() || events.iter().any(|e| selects(p.as_ref(), &e.doc));
            if held.models[pi].is_none() && needed {
                let model = if assume_new {
                    plan.assumed.push(pi);
                    ReadModel::empty(aggregate_id)
                } else {
                    self.store.load(p.as_ref(), aggregate_id).await?
                };
                let v = model.version;
                held.models[pi] = Some((model, v));
            }
            if let Some((m, _)) = &held.models[pi] {
                plan.base = plan.base.max(m.version);
            }
        }
        // Durable after this batch, unless a stop lowers it: its last event, or what the models
        // already held when that is more (a batch of duplicates).
        plan.limit = events.iter().map(|e| e.version).fold(plan.base, i64::max);
        for (pi, p) in self.projections.iter().enumerate() {
            let Some((model, _)) = &held.models[pi] else {
                continue;
            };
            let mut model = model.clone();
            if let Some(s) = self
                .fold(
                    p.as_ref(),
                    &mut model,
                    events,
                    plan.limit,
                    &mut plan.gap_events,
                )
                .await?
            {
                lower(&mut plan.limit, &mut plan.stop, s);
            }
        }
        Ok(plan)
    }
}

/// The stop at `version` of projection `p`, for `reason`.
pub(super) fn stop_at(
    p: &dyn Projection,
    version: i64,
    reason: &'static str,
    description: String,
) -> Stop {
    Stop {
        version,
        poison: Poison {
            reason,
            description,
            projection: p.name().to_string(),
        },
    }
}

/// A projection cannot apply an event of `aggregate_id`: logged, and a poison stop.
pub(super) fn projection_error(p: &dyn Projection, aggregate_id: &str, err: ApplyError) -> Stop {
    tracing::error!(aggregate = %aggregate_id, projection = p.name(), event_id = err.event_id, error = %err, "projection error");
    stop_at(p, err.event_id, REASON_PROJECTION, err.to_string())
}

/// What [`Engine::plan`] found before anything is written.
struct Plan {
    /// The highest version that can be made durable.
    limit: i64,
    /// The highest version the models held.
    base: i64,
    /// Where folding must stop, if it must.
    stop: Option<Stop>,
    /// Events read from the events collection to fill gaps.
    gap_events: BTreeMap<i64, Document>,
    /// Projections whose model was taken as empty without reading it.
    assumed: Vec<usize>,
}

/// Lowers `limit` to just below `s`, which becomes the stop, when `s` is at or below it.
fn lower(limit: &mut i64, stop: &mut Option<Stop>, s: Stop) {
    if s.version <= *limit {
        *limit = s.version - 1;
        *stop = Some(s);
    }
}
