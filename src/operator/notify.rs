//! Status callbacks in Kubernetes mode, off the reconcile path: the reconciler records a
//! callback as in flight (who, since when) in the BuildJob status, then `spawn`s its
//! delivery here. The task retries within CALLBACK_RETRY_SECONDS (and stops trying at
//! `sender_life`), then records the callback as sent (delivered, or given up with a Warning
//! event) with an optimistic status write. A slow receiver holds up nothing but its own task.

use super::controller::CallbackSecrets;
use super::controller::{
    callback_secrets, fetch_secret, lock, owned_secret, publish, record_status, Context,
    SECRET_WAIT,
};
use super::crd::{BuildJob, CallbackInFlight, Phase};
use super::decide::{CallbackKind, EventNote};
use futures::FutureExt;
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The callback client's per-request timeout (`crate::callback`): a delivery's last attempt
/// may start just before CALLBACK_RETRY_SECONDS ends and run this long.
pub const LAST_ATTEMPT: Duration = Duration::from_secs(30);

/// Between the end of a sender's life and a takeover: a late timer, clocks that run at
/// slightly different rates, a request already on the wire.
pub const TAKEOVER_MARGIN: Duration = Duration::from_secs(30);

/// How long a sender may try to send (read the credentials Secret, deliver with retries),
/// counted from just before the status write that records it in flight. Then it stops.
pub fn sender_life(callback_budget: Duration) -> Duration {
    callback_budget + LAST_ATTEMPT
}

/// How long a callback recorded in flight by another sender is trusted, counted from when
/// this process first saw the record. Anyone sees a record only after the write that made
/// it began, and its sender stops `sender_life` after that: so a takeover never sends while
/// the recording sender may still be sending, whatever the replicas' clocks say.
pub fn takeover_after(callback_budget: Duration) -> Duration {
    sender_life(callback_budget) + TAKEOVER_MARGIN
}

/// Past this many BuildJobs the log starts over (forgetting costs a takeover wait, never a
/// second send).
const LOG_MAX: usize = 16_384;

/// One in-flight record as the API server keeps it (`since` in whole seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    status: String,
    by: String,
    since: i64,
}

impl Record {
    fn of(f: &CallbackInFlight) -> Self {
        Record {
            status: f.status.clone(),
            by: f.by.clone(),
            since: f.since.0.as_second(),
        }
    }
}

/// What this process knows of callbacks recorded in flight, by BuildJob uid.
#[derive(Default)]
pub struct InFlightLog {
    /// The last record this process wrote (or tried to: the answer may be lost while the
    /// write commits), and whether a sender was started for it.
    wrote: Mutex<HashMap<String, (Record, bool)>>,
    /// The record this process last saw, and when it first saw it.
    seen: Mutex<HashMap<String, (Record, Instant)>>,
}

impl InFlightLog {
    /// Notes a record about to be written.
    pub fn writing(&self, uid: &str, f: &CallbackInFlight) {
        let rec = Record::of(f);
        let mut wrote = lock(&self.wrote);
        // The same record again (within its second): a sender it had stays known.
        if wrote
            .get(uid)
            .is_some_and(|(r, started)| *r == rec && *started)
        {
            return;
        }
        bounded(&mut wrote, uid).insert(uid.to_string(), (rec, false));
    }

    /// Notes that a sender has started for `uid`'s record `f` (the last one written when
    /// `None`). It stays started after the sender ends: one that delivered but could not
    /// record it must not be mistaken for a record nobody sent.
    pub fn started(&self, uid: &str, f: Option<&CallbackInFlight>) {
        let mut wrote = lock(&self.wrote);
        match f {
            Some(f) => {
                bounded(&mut wrote, uid).insert(uid.to_string(), (Record::of(f), true));
            }
            None => {
                if let Some((_, started)) = wrote.get_mut(uid) {
                    *started = true;
                }
            }
        }
    }

    /// Whether `f` is a record this process wrote and never started a sender for.
    pub fn unstarted(&self, uid: &str, f: &CallbackInFlight) -> bool {
        let rec = Record::of(f);
        lock(&self.wrote)
            .get(uid)
            .is_some_and(|(r, started)| *r == rec && !*started)
    }

    /// How long this process has seen `f` as `uid`'s record (zero the first time); `None`
    /// (no record) forgets the last one seen.
    pub fn seen_for(&self, uid: &str, f: Option<&CallbackInFlight>, now: Instant) -> Duration {
        let mut seen = lock(&self.seen);
        let Some(f) = f else {
            seen.remove(uid);
            return Duration::ZERO;
        };
        let rec = Record::of(f);
        match seen.get(uid) {
            Some((r, first)) if *r == rec => now.saturating_duration_since(*first),
            _ => {
                bounded(&mut seen, uid).insert(uid.to_string(), (rec, now));
                Duration::ZERO
            }
        }
    }

    pub fn forget(&self, uid: &str) {
        lock(&self.wrote).remove(uid);
        lock(&self.seen).remove(uid);
    }

    /// Makes this process have seen `uid`'s record `by` longer (a test stands in for time).
    #[cfg(test)]
    pub(crate) fn backdate(&self, uid: &str, by: Duration) {
        if let Some((_, first)) = lock(&self.seen).get_mut(uid) {
            *first = first.checked_sub(by).unwrap_or(*first);
        }
    }
}

fn bounded<'a, V>(map: &'a mut HashMap<String, V>, uid: &str) -> &'a mut HashMap<String, V> {
    if map.len() >= LOG_MAX && !map.contains_key(uid) {
        map.clear();
    }
    map
}

/// The legacy status word of a callback.
pub fn status_word(kind: CallbackKind) -> &'static str {
    match kind {
        CallbackKind::Pending => "pending",
        CallbackKind::Final(s) => s,
    }
}

/// The callback's Authorization and whole URL (from the BuildJob's credentials Secret).
pub enum Auth {
    /// The reconcile read the Secret already.
    Known(CallbackSecrets),
    /// The sender reads it; `wait`: a young BuildJob's Secret may not exist yet (the facade
    /// creates it just after the BuildJob), so wait for it up to SECRET_WAIT after the
    /// BuildJob was created.
    Read { wait: bool },
}

/// Starts delivering `kind` for `job` (as the reconcile wrote it, the callback recorded in
/// flight) unless this process already is. It stops trying at `deadline` (see
/// `sender_life`).
pub fn spawn(ctx: Arc<Context>, job: &BuildJob, auth: Auth, kind: CallbackKind, deadline: Instant) {
    let uid = job.uid().unwrap_or_default();
    let name = job.name_any();
    // Before anything else: from here on this record may be sent.
    let in_flight = job
        .status
        .as_ref()
        .and_then(|s| s.callbacks.in_flight.as_ref());
    ctx.in_flight.started(&uid, in_flight);
    if !lock(&ctx.sending).insert(uid.clone()) {
        // `callback_plan` waits while a sender runs, so this is not expected.
        tracing::warn!(job = %name, "a sender for this BuildJob is still running; the callback recorded in flight waits for a takeover");
        return;
    }
    let job = job.clone();
    // Tracked: a shutdown lets it finish (within the grace period) rather than cut it, which
    // the next leader would only notice, and send again, after its takeover wait.
    let senders = ctx.senders.clone();
    senders.spawn(async move {
        let done = AssertUnwindSafe(deliver(&ctx, &job, auth, kind, deadline))
            .catch_unwind()
            .await;
        lock(&ctx.sending).remove(&uid);
        if done.is_err() {
            tracing::error!(job = %name, "a callback sender panicked; the callback waits for a takeover");
        }
    });
}

/// Delivers `kind` for `job` (trying until `deadline`), then records it sent.
async fn deliver(ctx: &Context, job: &BuildJob, auth: Auth, kind: CallbackKind, deadline: Instant) {
    let name = job.name_any();
    let word = status_word(kind);
    if let Some(spec_url) = job.spec.callback.as_deref().filter(|u| !u.is_empty()) {
        let send = async {
            let secrets = match auth {
                Auth::Known(a) => a,
                Auth::Read { wait } => credentials(ctx, job, wait).await,
            };
            // Without the Secret, the spec's URL (the receiver then refuses it, as it does
            // a callback without its Authorization).
            let url = secrets.url.as_ref().map_or(spec_url, |u| u.expose());
            ctx.callbacks
                .deliver(url, secrets.auth.as_ref(), job.spec.build_number, word)
                .await
                .map_err(|e| e.to_string())
        };
        // Past the deadline another leader may take the callback over: stop trying.
        let sent = tokio::time::timeout_at(deadline, send)
            .await
            .unwrap_or_else(|_| {
                Err(
                    "its sender ran out of time (CALLBACK_RETRY_SECONDS plus 30 s \
                     from when it was recorded in flight)"
                        .to_string(),
                )
            });
        if let Err(e) = sent {
            tracing::warn!(job = %name, error = %e, "callback not delivered");
            ctx.observer.callback_failed();
            let note = EventNote {
                warning: true,
                reason: "CallbackFailed".into(),
                note: format!("the {word} callback was not delivered: {e}"),
            };
            publish(ctx, &job.object_ref(&()), &note).await;
        }
    }
    record(ctx, job, kind).await;
}

/// Marks the callback sent on `written` (the BuildJob as the reconcile wrote it).
async fn record(ctx: &Context, written: &BuildJob, kind: CallbackKind) {
    let name = written.name_any();
    let recorded = record_status(ctx, written, "a sent callback", |job| {
        let mut st = job.status.clone().unwrap_or_default();
        match kind {
            CallbackKind::Pending => st.callbacks.pending = true,
            CallbackKind::Final(_) => {
                st.callbacks.final_ = true;
                let created = job.creation_timestamp().map(|t| t.0);
                if let Some(c) = created {
                    st.timings_mut().final_callback_ms =
                        u64::try_from(Timestamp::now().duration_since(c).as_millis()).ok();
                }
            }
        }
        let ours = st
            .callbacks
            .in_flight
            .as_ref()
            .is_some_and(|f| f.by == ctx.identity && f.status == status_word(kind));
        if ours {
            st.callbacks.in_flight = None;
        }
        Some(st)
    })
    .await;
    match recorded {
        Ok(Some(st))
            if matches!(kind, CallbackKind::Final(_))
                && st.phase.is_some_and(Phase::is_finished) =>
        {
            tracing::info!(job = %name, "final callback sent");
        }
        Ok(_) => {}
        Err(()) => {
            tracing::error!(job = %name, "gave up recording a sent callback; the next leader may send it again")
        }
    }
}

/// The callback secrets from the BuildJob's own credentials Secret. Waits for a
/// missing Secret while `wait` and the BuildJob is young; an API error is retried within
/// the callback budget. Without it the callback goes out without Authorization (warned).
async fn credentials(ctx: &Context, job: &BuildJob, wait: bool) -> CallbackSecrets {
    let (name, ns) = (job.name_any(), job.namespace().unwrap_or_default());
    let created = job.creation_timestamp().map(|t| t.0);
    let give_up = tokio::time::Instant::now() + ctx.callback_budget;
    let mut delay = Duration::from_millis(500);
    loop {
        match fetch_secret(&ctx.client, &ns, &name).await {
            Ok(secret) => {
                if let Some(s) = owned_secret(secret, job) {
                    let auth = callback_secrets(Some(&s));
                    ctx.credentials_read(job, auth.clone());
                    return auth;
                }
                let age =
                    created.map_or(i64::MAX, |c| Timestamp::now().duration_since(c).as_secs());
                if !wait || age >= SECRET_WAIT.as_secs() as i64 {
                    tracing::warn!(job = %name, "the credentials Secret is missing (or not owned by this BuildJob); the callback goes without Authorization");
                    return CallbackSecrets::default();
                }
                tracing::debug!(job = %name, "waiting for the credentials Secret");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) if tokio::time::Instant::now() < give_up => {
                tracing::warn!(job = %name, error = %e, "cannot read the credentials Secret yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::warn!(job = %name, error = %e, "cannot read the credentials Secret; the callback goes without Authorization");
                return CallbackSecrets::default();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn a_sender_has_stopped_before_its_callback_may_be_taken_over() {
        // The defaults: CALLBACK_RETRY_SECONDS=300, a sender stops at 330 s, a takeover at 360 s.
        let budget = Duration::from_secs(300);
        assert_eq!(sender_life(budget), Duration::from_secs(330));
        assert_eq!(takeover_after(budget), Duration::from_secs(360));
        for secs in [0, 2, 20, 300, 86_400] {
            let b = Duration::from_secs(secs);
            // The delivery's own worst case: retries within the budget, then a last attempt.
            assert!(sender_life(b) >= b + LAST_ATTEMPT, "{secs}");
            assert!(
                takeover_after(b) >= sender_life(b) + TAKEOVER_MARGIN,
                "{secs}"
            );
        }
        assert!(TAKEOVER_MARGIN > Duration::ZERO);
    }

    fn rec(by: &str, status: &str, since: i64) -> CallbackInFlight {
        CallbackInFlight {
            status: status.into(),
            by: by.into(),
            since: Time(Timestamp::from_second(since).expect("a time")),
        }
    }

    #[test]
    fn only_a_record_this_process_wrote_and_never_started_is_unstarted() {
        let log = InFlightLog::default();
        let ours = rec("me", "pending", 1_000);
        assert!(!log.unstarted("u", &ours), "nothing written yet");
        log.writing("u", &ours);
        assert!(log.unstarted("u", &ours));
        // The API server keeps whole seconds.
        let mut read = ours.clone();
        read.since = Time(Timestamp::from_second(1_000).expect("a time"));
        assert!(log.unstarted("u", &read));
        for other in [
            rec("me", "pending", 1_001),
            rec("me", "succeeded", 1_000),
            rec("other", "pending", 1_000),
        ] {
            assert!(!log.unstarted("u", &other), "{other:?}");
        }
        assert!(!log.unstarted("v", &ours), "another BuildJob");
        // Once its sender has started it stays started, even when the sender has ended
        // (delivered, maybe, and not yet recorded) and the same record is written again.
        log.started("u", Some(&ours));
        assert!(!log.unstarted("u", &ours));
        log.writing("u", &ours);
        assert!(!log.unstarted("u", &ours));
        // A new record is a new question.
        let next = rec("me", "succeeded", 2_000);
        log.writing("u", &next);
        assert!(log.unstarted("u", &next));
        log.forget("u");
        assert!(!log.unstarted("u", &next));
    }

    #[test]
    fn a_record_is_timed_from_when_this_process_first_saw_it() {
        let log = InFlightLog::default();
        let t0 = Instant::now();
        let a = rec("other", "pending", 1_000);
        assert_eq!(log.seen_for("u", Some(&a), t0), Duration::ZERO);
        let later = t0 + Duration::from_secs(40);
        assert_eq!(log.seen_for("u", Some(&a), later), Duration::from_secs(40));
        // A different record (a new sender's) starts the count again.
        let b = rec("other", "pending", 1_001);
        assert_eq!(log.seen_for("u", Some(&b), later), Duration::ZERO);
        // So does a record gone and back.
        assert_eq!(log.seen_for("u", None, later), Duration::ZERO);
        let again = later + Duration::from_secs(5);
        assert_eq!(log.seen_for("u", Some(&b), again), Duration::ZERO);
    }
}
