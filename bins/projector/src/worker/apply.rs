//! Applying events: fold them into the aggregate's read models (filling gaps from the events
//! collection) and write each changed model once, guarded by the version it was read at.

use ordo_projection::ApplyError;

use super::session::Held;
use super::{Applied, Engine, Event, WorkError};
use crate::settle::{
    Poison, Stop, REASON_DUPLICATE, REASON_GAP, REASON_PROJECTION, REASON_REFUSED, REASON_SOURCE,
};
use crate::store::{StoreError, Written};
use mongodb::bson::Document;
use ordo_core::metrics as m;
use ordo_projection::{event_version, fold_events, selects, Gap, Projection, ReadModel};
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

    /// Folds the events up to `limit` into `model`, filling gaps from the events collection.
    /// Returns where folding must stop, if it must.
    pub(super) async fn fold(
        &self,
        p: &dyn Projection,
        model: &mut ReadModel,
        events: &[&Event],
        limit: i64,
        gap_events: &mut BTreeMap<i64, Document>,
    ) -> Result<Option<Stop>, StoreError> {
        let docs: Vec<&Document> = events
            .iter()
            .filter(|e| e.version <= limit)
            .map(|e| &e.doc)
            .collect();
        loop {
            match fold_events(p, model, docs.iter().copied()) {
                Ok(None) => return Ok(None),
                Ok(Some(gap)) => {
                    if let Some(s) = self.fill_gap(p, model, gap, gap_events).await? {
                        return Ok(Some(s));
                    }
                }
                Err(e) => return Ok(Some(projection_error(p, &model.id, e))),
            }
        }
    }

    /// Applies the missing versions of `gap` to `model`, read from the events collection first
    /// unless an earlier fold of this batch read them. Where folding must stop instead, if it
    /// must: the gap not filled, an invalid or duplicated source event, a projection error.
    async fn fill_gap(
        &self,
        p: &dyn Projection,
        model: &mut ReadModel,
        Gap { from, to }: Gap,
        gap_events: &mut BTreeMap<i64, Document>,
    ) -> Result<Option<Stop>, StoreError> {
        if (from..=to).any(|v| !gap_events.contains_key(&v)) {
            if let Some(s) = self.read_gap(p, &model.id, from, to, gap_events).await? {
                return Ok(Some(s));
            }
        }
        for v in from..=to {
            // The read returned every version of the range, each once.
            let Some(e) = gap_events.get(&v) else {
                let description = format!(
                    "event v{v} of {} was not read while filling the gap",
                    model.id
                );
                return Ok(Some(stop_at(p, v, REASON_GAP, description)));
            };
            if let Err(e) = model.apply(p, e) {
                return Ok(Some(projection_error(p, &model.id, e)));
            }
        }
        Ok(None)
    }

    /// Reads versions `from..=to` of `id` into `gap_events`, waiting up to `gap_timeout` for
    /// them ([`Store::wait_for_events`]). The stop when they cannot be had: not all there in
    /// time, or a source event that breaks the contract; a database fault is an error.
    async fn read_gap(
        &self,
        p: &dyn Projection,
        id: &str,
        from: i64,
        to: i64,
        gap_events: &mut BTreeMap<i64, Document>,
    ) -> Result<Option<Stop>, StoreError> {
        match self
            .store
            .wait_for_events(id, from, to, self.cfg.gap_timeout)
            .await
        {
            Ok(Some(found)) => {
                metrics::counter!(m::GAP_EVENTS_FILLED).increment(found.len() as u64);
                tracing::info!(aggregate = %id, from, to, "gap filled from the events collection");
                for e in found {
                    gap_events.insert(event_version(&e), e);
                }
                Ok(None)
            }
            Ok(None) => {
                let description = format!(
                    "events v{from}..v{to} of {id} not found in the events collection within {:?}",
                    self.cfg.gap_timeout
                );
                Ok(Some(stop_at(p, from, REASON_GAP, description)))
            }
            Err(e @ StoreError::BadEvent { .. }) => {
                Ok(Some(stop_at(p, from, REASON_SOURCE, e.to_string())))
            }
            Err(e @ StoreError::DuplicateVersion { .. }) => {
                Ok(Some(stop_at(p, from, REASON_DUPLICATE, e.to_string())))
            }
            Err(e) => Err(e),
        }
    }
}

/// The stop at `version` of projection `p`, for `reason`.
fn stop_at(p: &dyn Projection, version: i64, reason: &'static str, description: String) -> Stop {
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
fn projection_error(p: &dyn Projection, aggregate_id: &str, err: ApplyError) -> Stop {
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
