//! Leader election with a `coordination.k8s.io/v1` Lease, written directly and following
//! client-go's rules: one controller acts at a time; the facade runs in any number of
//! replicas.
//!
//! - Every API call has a timeout: a hung renewal cannot keep a leader going.
//! - The leader stops its work once it has not renewed for `renew_deadline`, which is
//!   shorter than the lease duration: it has stopped before anyone may take over.
//! - A follower judges expiry by its own clock, from when it last saw the lease record
//!   change, never by comparing the holder's `renewTime` with the local time (clocks skew).
//! - Optimistic concurrency (the resourceVersion on replace) gives a takeover race one
//!   winner.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::Api;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    renew_deadline: Duration,
    retry_period: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the Lease call did not answer within {0:?}")]
    Timeout(Duration),
}

/// What this process last saw of the lease, and when by its own clock.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    record: Option<(String, Option<String>, Option<i32>)>,
    at: Option<Instant>,
}

impl Observed {
    /// Notes the lease as read at `now`; returns whether its holder may be presumed gone:
    /// the same record has been seen unchanged for the lease's whole duration.
    pub fn expired(&mut self, spec: Option<&LeaseSpec>, now: Instant) -> bool {
        let record = spec.map(|s| {
            (
                s.holder_identity.clone().unwrap_or_default(),
                s.renew_time.as_ref().map(|t| t.0.to_string()),
                s.lease_duration_seconds,
            )
        });
        if record != self.record || self.at.is_none() {
            self.record = record;
            self.at = Some(now);
            return false;
        }
        let secs = spec.and_then(|s| s.lease_duration_seconds).unwrap_or(15);
        let since = now.saturating_duration_since(self.at.unwrap_or(now));
        since >= Duration::from_secs(u64::try_from(secs.max(1)).unwrap_or(15))
    }
}

/// Whether `identity` may take (or keep) the lease as it stands: it is free, ours, or
/// its holder has not renewed for a whole lease duration as this process observed it.
pub fn may_hold(
    spec: Option<&LeaseSpec>,
    identity: &str,
    observed: &mut Observed,
    now: Instant,
) -> bool {
    let expired = observed.expired(spec, now);
    let Some(spec) = spec else { return true };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    holder.is_empty() || holder == identity || expired
}

/// The lease spec after `identity` took or renewed it at `now`.
pub fn taken(
    prev: Option<&LeaseSpec>,
    identity: &str,
    duration: Duration,
    now: Timestamp,
) -> LeaseSpec {
    let ours = prev.and_then(|p| p.holder_identity.as_deref()) == Some(identity);
    let transitions = prev.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)),
        acquire_time: if ours {
            prev.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if ours || prev.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..Default::default()
    }
}

impl LeaseLock {
    /// client-go's defaults in proportion: renew deadline 2/3 and retry period 2/15 of the
    /// lease duration (15 s → 10 s and 2 s).
    pub fn new(
        api: Api<Lease>,
        name: impl Into<String>,
        identity: impl Into<String>,
        duration: Duration,
    ) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
            renew_deadline: duration * 2 / 3,
            retry_period: (duration * 2 / 15).max(Duration::from_millis(200)),
        }
    }

    async fn call<T>(
        &self,
        f: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, LeaseError> {
        // Up to the renew deadline, as client-go bounds each try: an API server slower than
        // the retry period (2 s) must not keep every replica from leading.
        match tokio::time::timeout(self.renew_deadline, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(LeaseError::Timeout(self.renew_deadline)),
        }
    }

    /// Takes or renews the lease; `Ok(false)` when someone else holds it (or won a race).
    pub async fn try_acquire(&self, observed: &mut Observed) -> Result<bool, LeaseError> {
        let now = Timestamp::now();
        match self.call(self.api.get_opt(&self.name)).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(taken(None, &self.identity, self.duration, now)),
                };
                match self
                    .call(self.api.create(&PostParams::default(), &lease))
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(LeaseError::Kube(kube::Error::Api(s))) if s.is_already_exists() => {
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                if !may_hold(
                    lease.spec.as_ref(),
                    &self.identity,
                    observed,
                    Instant::now(),
                ) {
                    return Ok(false);
                }
                lease.spec = Some(taken(
                    lease.spec.as_ref(),
                    &self.identity,
                    self.duration,
                    now,
                ));
                match self
                    .call(self.api.replace(&self.name, &PostParams::default(), &lease))
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(LeaseError::Kube(kube::Error::Api(s))) if s.is_conflict() => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Gives the lease up (on shutdown) so another replica takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.call(self.api.get_opt(&self.name)).await else {
            return;
        };
        let ours = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(self.identity.as_str());
        if !ours {
            return;
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
        }
        if let Err(e) = self
            .call(self.api.replace(&self.name, &PostParams::default(), &lease))
            .await
        {
            tracing::warn!(lease = %self.name, error = %e, "could not release the controller Lease; it expires on its own");
        }
    }

    /// Runs `work()` while this process holds the lease: waits to acquire it, renews it
    /// every retry period, and drops the work (stopping it) as soon as it has gone
    /// `renew_deadline` without a successful renewal. Returns when `shutdown` resolves.
    pub async fn run_while_leader<F, Fut>(&self, mut work: F, shutdown: impl Future<Output = ()>)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        tokio::pin!(shutdown);
        let mut observed = Observed::default();
        loop {
            // Follower: wait for the lease.
            loop {
                match self.try_acquire(&mut observed).await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(lease = %self.name, error = %e, "cannot read the controller Lease")
                    }
                }
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(self.retry_period) => {}
                }
            }
            tracing::info!(lease = %self.name, identity = %self.identity, "leading: the controller runs here");
            let renew = async {
                let mut last_ok = Instant::now();
                loop {
                    tokio::time::sleep(self.retry_period).await;
                    let deadline = last_ok + self.renew_deadline;
                    match tokio::time::timeout_at(deadline, self.try_acquire(&mut observed)).await {
                        Ok(Ok(true)) => last_ok = Instant::now(),
                        // The Lease changed since it was read (a conflict), often by this
                        // replica's own renewal whose answer was lost: try again until the
                        // deadline, as client-go does. No one else may take it before the
                        // lease duration, which is longer.
                        Ok(Ok(false)) => {
                            tracing::debug!(lease = %self.name, "renewing the controller Lease met a conflict; trying again");
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(lease = %self.name, error = %e, "cannot renew the controller Lease");
                        }
                        Err(_) => {}
                    }
                    if Instant::now() >= deadline {
                        return;
                    }
                }
            };
            let working = work();
            tokio::pin!(working);
            // Shutdown first: the work ends on shutdown too, often in the same poll, and
            // a random pick would skip the release (a 15 s failover instead of none).
            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    // The work sees the same shutdown and lets what it started end (a
                    // callback's record, a status write): wait for that, well within the
                    // renew deadline, before another replica may lead.
                    if tokio::time::timeout(self.renew_deadline / 2, &mut working).await.is_err() {
                        tracing::warn!(lease = %self.name, "the controller's work did not end in time; stopping it");
                    }
                    self.release().await;
                    return;
                }
                _ = &mut working => {
                    tracing::warn!("the controller stopped while leading; releasing the Lease");
                    self.release().await;
                    return;
                }
                _ = renew => tracing::warn!(lease = %self.name, "lost the controller Lease (not renewed within the renew deadline); stopped the controller, standing by"),
            }
            observed = Observed::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::mock::{self, status_error, Expect};
    use http::Method;
    use serde_json::json;
    use std::sync::Arc;

    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/builds/leases/ctl";

    fn lock(client: kube::Client) -> LeaseLock {
        LeaseLock::new(
            Api::namespaced(client, "builds"),
            "ctl",
            "me",
            Duration::from_secs(15),
        )
    }

    /// The Lease as this replica ("me") holds it.
    fn mine(rv: &str, seconds: u32) -> serde_json::Value {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "ctl", "namespace": "builds", "resourceVersion": rv},
            "spec": {"holderIdentity": "me", "leaseDurationSeconds": seconds}})
    }

    /// The first acquisition: no Lease yet, so it is created.
    fn created() -> [Expect; 2] {
        [
            Expect::new(Method::GET, LEASE, 404, Some(status_error(404, "NotFound"))),
            Expect::new(
                Method::POST,
                "/apis/coordination.k8s.io/v1/namespaces/builds/leases",
                201,
                None,
            ),
        ]
    }

    fn lease(rv: &str, renew: &str) -> serde_json::Value {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "ctl", "namespace": "builds", "resourceVersion": rv},
            "spec": {"holderIdentity": "other", "leaseDurationSeconds": 15, "renewTime": renew, "leaseTransitions": 3}})
    }

    #[tokio::test]
    async fn acquire_creates_then_waits_a_whole_duration_of_silence_before_taking_over() {
        let (client, handle) = mock::client();
        // The holder's renewTime is far in the past by our clock: that alone proves nothing
        // (clocks skew); only seeing the record unchanged for 15 s of our own time does.
        let old = "2020-01-01T00:00:00.000000Z";
        let [absent, create] = created();
        let scenario = vec![
            absent,
            create.check(|b| assert_eq!(b["spec"]["holderIdentity"], "me")),
            Expect::new(Method::GET, LEASE, 200, Some(lease("8", old))),
            Expect::new(Method::GET, LEASE, 200, Some(lease("8", old))),
            Expect::new(Method::GET, LEASE, 200, Some(lease("8", old))),
            Expect::new(Method::PUT, LEASE, 200, None).check(|b| {
                assert_eq!(b["spec"]["holderIdentity"], "me");
                assert_eq!(b["spec"]["leaseTransitions"], 4);
                assert_eq!(
                    b["metadata"]["resourceVersion"], "8",
                    "optimistic concurrency"
                );
            }),
        ];
        let verifier = mock::verify(handle, scenario);
        let l = lock(client);
        let mut seen = Observed::default();
        let created = l.try_acquire(&mut seen).await.ok();
        let mut seen = Observed::default();
        let first_look = l.try_acquire(&mut seen).await.ok();
        // As if that first look had been 14 s ago, then 15 s ago (our own clock).
        seen.at = Instant::now().checked_sub(Duration::from_secs(14));
        let still_young = l.try_acquire(&mut seen).await.ok();
        seen.at = Instant::now().checked_sub(Duration::from_secs(15));
        let taken = l.try_acquire(&mut seen).await.ok();
        drop(l);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        assert_eq!(
            (created, first_look, still_young, taken),
            (Some(true), Some(false), Some(false), Some(true))
        );
    }

    #[test]
    fn a_lease_is_free_when_absent_ours_released_or_silent_for_its_duration() {
        let t0 = Instant::now();
        let mut seen = Observed::default();
        assert!(may_hold(None, "a", &mut seen, t0));
        let held = taken(None, "b", Duration::from_secs(15), Timestamp::UNIX_EPOCH);
        let mut seen = Observed::default();
        assert!(!may_hold(Some(&held), "a", &mut seen, t0));
        assert!(!may_hold(
            Some(&held),
            "a",
            &mut seen,
            t0 + Duration::from_secs(14)
        ));
        assert!(may_hold(
            Some(&held),
            "b",
            &mut seen,
            t0 + Duration::from_secs(1)
        ));
        // A renewal (a changed record) restarts the count.
        let renewed = taken(
            Some(&held),
            "b",
            Duration::from_secs(15),
            Timestamp::from_second(10).unwrap_or(Timestamp::UNIX_EPOCH),
        );
        assert!(!may_hold(
            Some(&renewed),
            "a",
            &mut seen,
            t0 + Duration::from_secs(16)
        ));
        assert!(!may_hold(
            Some(&renewed),
            "a",
            &mut seen,
            t0 + Duration::from_secs(30)
        ));
        assert!(may_hold(
            Some(&renewed),
            "a",
            &mut seen,
            t0 + Duration::from_secs(31)
        ));
        assert_eq!(renewed.acquire_time, held.acquire_time);
        assert_eq!(renewed.lease_transitions, Some(0));
        let stolen = taken(
            Some(&renewed),
            "a",
            Duration::from_secs(15),
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(stolen.lease_transitions, Some(1));
        assert_eq!(stolen.holder_identity.as_deref(), Some("a"));
        let mut released = renewed.clone();
        released.holder_identity = None;
        assert!(may_hold(Some(&released), "a", &mut Observed::default(), t0));
    }

    /// A renewal that meets a conflict (its own earlier renewal committed, its answer lost)
    /// is tried again: the controller is not stopped and started over (a full relist).
    #[tokio::test]
    async fn a_conflict_while_renewing_is_tried_again_not_a_lost_lease() {
        let (client, handle) = mock::client();
        let renewed = Arc::new(tokio::sync::Notify::new());
        let r = renewed.clone();
        let mut scenario = Vec::from(created());
        scenario.extend([
            Expect::new(Method::GET, LEASE, 200, Some(mine("2", 2))),
            Expect::new(Method::PUT, LEASE, 409, Some(status_error(409, "Conflict"))),
            Expect::new(Method::GET, LEASE, 200, Some(mine("3", 2))),
            Expect::new(Method::PUT, LEASE, 200, None).check(move |_| r.notify_one()),
            // The release, on shutdown.
            Expect::new(Method::GET, LEASE, 200, Some(mine("4", 2))),
            Expect::new(Method::PUT, LEASE, 200, None),
        ]);
        let verifier = mock::verify(handle, scenario);
        let l = LeaseLock::new(
            Api::namespaced(client, "builds"),
            "ctl",
            "me",
            Duration::from_millis(1500),
        );
        let starts = std::sync::atomic::AtomicUsize::new(0);
        l.run_while_leader(
            || {
                starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::future::pending::<()>()
            },
            renewed.notified(),
        )
        .await;
        drop(l);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        assert_eq!(starts.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn shutdown_releases_the_lease_even_when_the_work_ends_in_the_same_poll() {
        // Without an order, `select!` picks either of two ready branches at random: 30
        // rounds make a skipped release all but certain to show.
        for _ in 0..30 {
            let (client, handle) = mock::client();
            let mut scenario = Vec::from(created());
            scenario.extend([
                Expect::new(Method::GET, LEASE, 200, Some(mine("2", 15))),
                Expect::new(Method::PUT, LEASE, 200, None).check(|b| {
                    assert!(b["spec"].get("holderIdentity").is_none(), "released: {b}");
                    assert_eq!(b["spec"]["leaseDurationSeconds"], 1);
                }),
            ]);
            let verifier = mock::verify(handle, scenario);
            let l = lock(client);
            // The controller returns as soon as shutdown begins: both are ready at once.
            l.run_while_leader(|| std::future::ready(()), std::future::ready(()))
                .await;
            drop(l);
            verifier
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        }
    }

    /// On shutdown the work ends what it started before the Lease goes to another replica.
    #[tokio::test]
    async fn shutdown_lets_the_work_finish_before_the_lease_is_released() {
        let (client, handle) = mock::client();
        let stop = tokio_util::sync::CancellationToken::new();
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, f) = (stop.clone(), finished.clone());
        let [absent, create] = created();
        let scenario = vec![
            absent,
            create.check(move |_| s.cancel()),
            Expect::new(Method::GET, LEASE, 200, Some(mine("2", 15))),
            Expect::new(Method::PUT, LEASE, 200, None).check(move |_| {
                assert!(
                    f.load(std::sync::atomic::Ordering::SeqCst),
                    "released first"
                )
            }),
        ];
        let verifier = mock::verify(handle, scenario);
        let l = lock(client);
        l.run_while_leader(
            || {
                let (stop, finished) = (stop.clone(), finished.clone());
                async move {
                    stop.cancelled().await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    finished.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            },
            stop.clone().cancelled_owned(),
        )
        .await;
        drop(l);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }

    #[tokio::test]
    async fn the_leader_stops_before_a_follower_may_take_over() {
        let l = LeaseLock::new(
            Api::namespaced(mock::client().0, "builds"),
            "ctl",
            "me",
            Duration::from_secs(15),
        );
        assert!(l.renew_deadline < l.duration);
        assert_eq!(l.renew_deadline, Duration::from_secs(10));
        assert_eq!(l.retry_period, Duration::from_secs(2));
    }
}
