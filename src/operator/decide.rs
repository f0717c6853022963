//! The controller's brain, a pure function: a BuildJob, its worker pod (if any), how many
//! builds hold a slot and how many queued builds are older, and the time → the next status
//! and the actions the reconciler must take. No I/O; every case is a unit test below.

use super::crd::{BuildCondition, BuildJob, BuildJobStatus, Phase, CONDITION_SUCCEEDED};
use super::pod::{pod_name, WORKER_CONTAINER};
use crate::build::Outcome;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use std::time::Duration;

/// Limits the decisions depend on.
#[derive(Clone, Debug)]
pub struct Settings {
    /// MAXIMUM_PARALLEL_BUILDS.
    pub max_parallel: usize,
    /// How many times a lost (evicted, deleted) worker pod is re-created.
    pub max_pod_retries: u32,
    /// How long a finished BuildJob is kept.
    pub finished_ttl: Duration,
    /// TIMEOUT_IN_MS: a pod that has not finished this long after it was created (plus
    /// `stuck_grace`) is deleted and the build failed with Timeout, even if the kubelet never
    /// started it (activeDeadlineSeconds only counts once it has).
    pub timeout: Duration,
    pub stuck_grace: Duration,
    /// POD_PENDING_LIMIT_SECONDS: an unschedulable worker pod fails the build this long
    /// after it was created.
    pub pending_limit: Duration,
    /// How many times a pod refused for a reason that may pass (a ResourceQuota) is retried.
    pub max_admission_retries: u32,
    /// A pod still terminating this long after its deletion deadline is lost (its node is
    /// gone): it is force-deleted and the build goes on without it.
    pub lost_pod_grace: Duration,
    /// QUEUED_RECHECK_SECONDS: how often a queued BuildJob looks at the queue again.
    pub queued_recheck: Duration,
}

/// What the decision is made from.
pub struct Inputs<'a> {
    pub job: &'a BuildJob,
    /// The pod named by `pod_name(job, status.podRetries)`, if it exists.
    pub pod: Option<&'a Pod>,
    /// Other BuildJobs holding a slot (Pending or Running).
    pub running: usize,
    /// Queued BuildJobs older than this one (they start first).
    pub queued_ahead: usize,
    pub now: Timestamp,
}

/// The finalizer that holds a BuildJob until its final callback is sent.
pub use super::crd::FINALIZER;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallbackKind {
    Pending,
    /// `succeeded` or `failed`.
    Final(&'static str),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventNote {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    CreatePod {
        name: String,
        attempt: u32,
    },
    DeletePod {
        name: String,
        /// Grace period 0: the pod's node is gone, nobody will stop it gracefully.
        force: bool,
    },
    /// Put the finalizer on the BuildJob (it lacks it, e.g. made by hand).
    AddFinalizer,
    /// Every callback is sent: nothing holds the BuildJob any more (deleted or not).
    RemoveFinalizer,
    /// Send, then record in status (`callbacks.pending` / `callbacks.final`).
    SendCallback(CallbackKind),
    RecordEvent(EventNote),
    Requeue(Duration),
    /// The TTL of a finished BuildJob has passed (its callbacks are all sent).
    DeleteJob,
    /// The build's log is not whole in storage: copy the worker pod's log there (its worker
    /// could not store it), then write the end no worker wrote; record both in status.
    EndLog(LogOwed),
}

/// What the controller still owes a build's stored log, in the order it writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogOwed {
    /// The worker could not store its log: copy it from the worker pod's log (`logCopied`).
    pub copy_pod_log: bool,
    /// The build ended failed and no worker wrote its end: `Build failed (reason): message`
    /// and `Build finished`, to the stored log and Kafka (`logEnded`).
    pub end: Option<LogEnd>,
}

/// The end of a build's log that the controller writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEnd {
    pub reason: String,
    pub message: String,
}

impl LogEnd {
    /// The line before `Build finished`, worded as the worker and local mode word it.
    pub fn failed_line(&self) -> String {
        format!("Build failed ({}): {}", self.reason, self.message)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub status: BuildJobStatus,
    pub actions: Vec<Action>,
}

/// What to do about a callback `decide` says is owed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallbackPlan {
    /// Record the intent (`callbacks.inFlight`), then send.
    Send,
    /// This process is sending it: the sender records the result.
    InProgress,
    /// Another sender (or this identity before a restart) may be at it: look again then.
    Wait(Duration),
}

/// What this process knows about a BuildJob's callback recorded in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SenderHere {
    /// A sender for this BuildJob runs in this process.
    pub running: bool,
    /// The record is one this process wrote and never started a sender for (the write
    /// committed but its answer was lost): nobody has sent it.
    pub unstarted: bool,
    /// How long this process has seen this very record. Counted on this process's clock,
    /// never from the record's `since` (another replica's clock).
    pub seen_for: Duration,
}

/// Whether this controller may send an owed callback now. A recorded in-flight send by
/// anyone else (or by this identity before a restart) is trusted for `takeover_after`
/// after this process first saw it: the recording sender has stopped by then (see
/// `notify::takeover_after`), so taking over re-sends only for a sender that died
/// mid-delivery.
pub fn callback_plan(
    sent: &super::crd::CallbacksSent,
    me: &str,
    here: SenderHere,
    takeover_after: Duration,
) -> CallbackPlan {
    let Some(f) = &sent.in_flight else {
        // This process's sender has recorded its callback but not yet let go of the job:
        // the next one waits a moment rather than start a sender that would not run.
        if here.running {
            return CallbackPlan::Wait(SENDER_FINISHING);
        }
        return CallbackPlan::Send;
    };
    if f.by == me && here.running {
        return CallbackPlan::InProgress;
    }
    if f.by == me && here.unstarted {
        return CallbackPlan::Send;
    }
    if here.seen_for >= takeover_after {
        CallbackPlan::Send
    } else {
        CallbackPlan::Wait(takeover_after - here.seen_for)
    }
}

/// How a pod ended, from its status.
#[derive(Clone, Debug, PartialEq)]
pub enum PodEnd {
    Evicted(String),
    /// Ended by something that is not the build's fault (drain, preemption, node
    /// shutdown, a deletion by someone else): the pod is re-created.
    Disrupted(String),
    DeadlineExceeded,
    OomKilled,
    /// The worker container exited; `outcome` is its termination message when it parses.
    Exited {
        code: i32,
        reason: String,
        outcome: Option<Outcome>,
    },
}

/// A worker pod as the decision sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum PodState {
    Absent,
    /// Being deleted (by someone else: the controller never waits on its own deletions).
    /// `overdue`: still there well past its deletion deadline, so its node is gone.
    Terminating {
        overdue: bool,
    },
    Pending(Option<StartProblem>),
    Running,
    Ended(PodEnd),
    /// The worker has ended but an ordinary container beside it (a sidecar a mutating
    /// webhook injected: istio-proxy, vault-agent) keeps the pod running: decided as
    /// `Ended`, and the pod is deleted so that container stops too.
    SidecarHeld(PodEnd),
}

/// Why a pending pod's containers do not start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartProblem {
    /// The kubelet's or scheduler's reason (ImagePullBackOff, Unschedulable, …).
    pub reason: String,
    pub message: String,
    /// It will not pass by waiting: fail the build now.
    pub fatal: bool,
    /// Not fatal yet, but will be this long from now if it has not passed (a failing
    /// image pull): look again then.
    pub fatal_in: Option<Duration>,
    /// The scheduler found no node: fails after `pending_limit`.
    pub unschedulable: bool,
    pub pod_created: Option<Timestamp>,
}

/// Container waiting reasons that mean the pod will never start as it is.
const FATAL_WAITING: &[&str] = &["InvalidImageName", "ErrImageNeverPull"];

/// Restarts of a crashing sidecar (before the worker has started) that end the build: a
/// daemon that cannot start three times over will not (a wrong DIND_IMAGE, a node that
/// refuses privileged containers).
const CRASH_LOOP_RESTARTS: i32 = 3;

/// Waiting reasons the kubelet retries that often pass: its Secret cache not synced yet (or
/// the node authorizer not yet knowing the pod) just after the build's Secret was made, a
/// runtime that timed out or still holds the container's name on a loaded node. These fail
/// the build after `CREATE_PATIENCE`, or at once when the kubelet names something missing.
const CREATE_WAITING: &[&str] = &["CreateContainerConfigError", "CreateContainerError"];

/// Words (lower case) of a create failure that waiting cannot fix: a Secret, ConfigMap or
/// key the pod needs does not exist.
const CREATE_HOPELESS: &[&str] = &["not found", "couldn't find key"];

/// How long a worker pod may wait on a failing container create, from when it was
/// scheduled (or created), before the build fails.
pub const CREATE_PATIENCE: Duration = Duration::from_secs(120);

/// Waiting reasons of a failing image pull. The kubelet retries the pull with backoff, and a
/// registry blip or a rate limit (`toomanyrequests`) passes, so these fail the build only
/// after `IMAGE_PULL_PATIENCE` (or at once when the kubelet's message says the image or
/// the right to pull it is missing).
const PULL_WAITING: &[&str] = &["ErrImagePull", "ImagePullBackOff"];

/// How long a worker pod may wait on a failing image pull, from when it was scheduled
/// (or created), before the build fails.
pub const IMAGE_PULL_PATIENCE: Duration = Duration::from_secs(120);

/// Words (lower case) of a pull failure that waiting cannot fix, as registries and
/// container runtimes put them (the kubelet's back-off message repeats the last pull
/// error since Kubernetes 1.32).
const PULL_HOPELESS: &[&str] = &[
    "not found",
    "manifest unknown",
    "unauthorized",
    "pull access denied",
    "repository does not exist",
];

/// Pod `status.reason`s of pods ended by the node or the cluster, not by the build. Besides
/// these, every `OutOf{resource}` (the kubelet refusing a pod the scheduler placed, for any
/// resource: cpu, memory, pods, ephemeral-storage, hugepages-…, an extended resource).
const DISRUPTION_REASONS: &[&str] = &[
    "NodeShutdown",
    "Shutdown",
    "Terminated",
    "Preempting",
    // The kubelet's other admission refusals (its `predicate.go`): a node whose labels,
    // taints or OS changed after the scheduler placed the pod.
    "UnexpectedAdmissionError",
    "UnexpectedPredicateFailureType",
    "UnknownReason",
    "NodeAffinity",
    "NodeName",
    "NodePorts",
    "TaintToleration",
    "PodOSSelectorNodeLabelDoesNotMatch",
    "PodOSNotSupported",
];

/// Reads a pod's status. Never assumes success: an ended worker's outcome comes only from
/// its termination message together with its exit code.
pub fn classify(pod: Option<&Pod>, now: Timestamp, lost_pod_grace: Duration) -> PodState {
    let Some(pod) = pod else {
        return PodState::Absent;
    };
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.as_deref().unwrap_or("Pending");
    let pod_ended = matches!(phase, "Succeeded" | "Failed");
    // With restartPolicy Never a terminated worker is final, whatever the pod's phase says
    // (an injected ordinary sidecar keeps it Running).
    let terminated = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == WORKER_CONTAINER)
        .and_then(|c| c.state.as_ref().and_then(|s| s.terminated.clone()));
    if !pod_ended && terminated.is_none() {
        if let Some(deadline) = &pod.metadata.deletion_timestamp {
            let overdue =
                now.duration_since(deadline.0).as_secs() >= lost_pod_grace.as_secs() as i64;
            return PodState::Terminating { overdue };
        }
        // `Unknown` (the node stopped reporting) is not a step back to Pending.
        return if phase == "Running" || phase == "Unknown" {
            PodState::Running
        } else {
            PodState::Pending(start_problem(pod, now))
        };
    }
    let end = pod_end(&status, terminated);
    // Native sidecars (init containers) stop by themselves once the worker has ended; an
    // ordinary container does not.
    let held = !pod_ended
        && status
            .container_statuses
            .iter()
            .flatten()
            .filter(|c| c.name != WORKER_CONTAINER)
            .any(|c| c.state.as_ref().is_none_or(|s| s.terminated.is_none()));
    if held {
        PodState::SidecarHeld(end)
    } else {
        PodState::Ended(end)
    }
}

/// How a pod whose worker (or the pod itself) has ended ended.
fn pod_end(
    status: &k8s_openapi::api::core::v1::PodStatus,
    terminated: Option<k8s_openapi::api::core::v1::ContainerStateTerminated>,
) -> PodEnd {
    let pod_reason = status.reason.clone().unwrap_or_default();
    let exited = terminated.map(|t| {
        if t.reason.as_deref() == Some("OOMKilled") {
            return PodEnd::OomKilled;
        }
        PodEnd::Exited {
            code: t.exit_code,
            reason: t.reason.unwrap_or_default(),
            outcome: t.message.as_deref().and_then(parse_termination_message),
        }
    });
    // The image is pushed: what happened to the pod afterwards (a drain's DisruptionTarget,
    // an eviction, its deadline) changes nothing.
    if let Some(
        done @ PodEnd::Exited {
            code: 0,
            outcome: Some(Outcome::Succeeded { .. }),
            ..
        },
    ) = exited
    {
        return done;
    }
    if pod_reason == "Evicted" {
        return PodEnd::Evicted(status.message.clone().unwrap_or_default());
    }
    if let Some(why) = disruption(status) {
        return PodEnd::Disrupted(why);
    }
    if pod_reason == "DeadlineExceeded" {
        return PodEnd::DeadlineExceeded;
    }
    // A node that crashed or rebooted under a running worker: the kubelet marks the
    // container it can no longer find `ContainerStatusUnknown` (exit 137), the runtime its
    // lost task `Unknown` (exit 255). Nothing the build did: run it again.
    if let Some(PodEnd::Exited {
        reason,
        outcome: None,
        ..
    }) = &exited
    {
        if reason == "ContainerStatusUnknown" || reason == "Unknown" {
            return PodEnd::Disrupted(format!(
                "{reason}: the node lost the worker's container (a crash or reboot?)"
            ));
        }
    }
    // Ended without a worker container status: it never ran (or the node lost it).
    exited.unwrap_or_else(|| PodEnd::Exited {
        code: -1,
        reason: if pod_reason.is_empty() {
            "NoContainerStatus".into()
        } else {
            pod_reason
        },
        outcome: None,
    })
}

/// Whether a kubelet's eviction message says the pod went past its own limits (its local
/// storage), not that the node ran short: `Usage of EmptyDir volume "docker" exceeds the
/// limit "20Gi".`, `Container worker exceeded its local ephemeral storage limit "10Gi".`,
/// `Pod ephemeral local storage usage exceeds the total limit of containers 10Gi.`
fn outgrew_its_limits(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("exceeds the limit")
        || m.contains("exceeded its local ephemeral storage limit")
        || m.contains("exceeds the total limit")
}

/// Whether the pod ended for something other than the build (a re-creation would follow).
fn ended_by_disruption(pod: &PodState) -> bool {
    let (PodState::Ended(end) | PodState::SidecarHeld(end)) = pod else {
        return false;
    };
    match end {
        PodEnd::Evicted(_) | PodEnd::Disrupted(_) => true,
        PodEnd::Exited {
            outcome: Some(Outcome::Failed { reason, .. }),
            ..
        } => *reason == crate::build::FailureReason::Interrupted,
        _ => false,
    }
}

/// Why a pod ended that was not the build's doing: a `DisruptionTarget` condition (drain,
/// Eviction API, preemption, taint manager, graceful node shutdown) or a node-side reason.
fn disruption(status: &k8s_openapi::api::core::v1::PodStatus) -> Option<String> {
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
    {
        return Some(format!(
            "{}: {}",
            c.reason.as_deref().unwrap_or("DisruptionTarget"),
            c.message.as_deref().unwrap_or("the pod was disrupted")
        ));
    }
    let reason = status.reason.as_deref().unwrap_or("");
    if DISRUPTION_REASONS.contains(&reason) || reason.starts_with("OutOf") {
        return Some(format!(
            "{reason}: {}",
            status
                .message
                .as_deref()
                .unwrap_or("the pod was stopped by its node")
        ));
    }
    None
}

/// Why a pending pod does not start, if the kubelet or the scheduler says.
fn start_problem(pod: &Pod, now: Timestamp) -> Option<StartProblem> {
    let status = pod.status.as_ref()?;
    let pod_created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let waiting = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .find_map(|c| {
            let w = c.state.as_ref()?.waiting.as_ref()?;
            let reason = w.reason.clone()?;
            (reason != "ContainerCreating" && reason != "PodInitializing").then(|| {
                (
                    c.name.clone(),
                    reason,
                    w.message.clone().unwrap_or_default(),
                    c.restart_count,
                )
            })
        });
    if let Some((container, reason, message, restarts)) = waiting {
        let patience = if PULL_WAITING.contains(&reason.as_str()) {
            Some((IMAGE_PULL_PATIENCE, PULL_HOPELESS))
        } else if CREATE_WAITING.contains(&reason.as_str()) {
            Some((CREATE_PATIENCE, CREATE_HOPELESS))
        } else {
            None
        };
        let (fatal, fatal_in) = if let Some((patience, hopeless)) = patience {
            // The pull (or the create) starts once the pod is on a node.
            let scheduled = status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "PodScheduled" && c.status == "True")
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| t.0);
            let waited = elapsed(scheduled.or(pod_created).unwrap_or(now), now);
            let lower = message.to_ascii_lowercase();
            if waited >= patience || hopeless.iter().any(|w| lower.contains(w)) {
                (true, None)
            } else {
                (false, Some(patience - waited))
            }
        } else if reason == "CrashLoopBackOff" {
            // A sidecar (the dind daemon) that keeps crashing before the worker starts:
            // the kubelet would go on restarting it until the build's timeout.
            (restarts >= CRASH_LOOP_RESTARTS, None)
        } else {
            (FATAL_WAITING.contains(&reason.as_str()), None)
        };
        return Some(StartProblem {
            message: format!("container {container}: {message}"),
            reason,
            fatal,
            fatal_in,
            unschedulable: false,
            pod_created,
        });
    }
    let unschedulable = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    })?;
    Some(StartProblem {
        reason: "Unschedulable".into(),
        message: unschedulable.message.clone().unwrap_or_default(),
        fatal: false,
        fatal_in: None,
        unschedulable: true,
        pod_created,
    })
}

/// The stage timings the worker put in its termination message, if any.
fn worker_stages(pod: Option<&Pod>) -> Option<std::collections::BTreeMap<String, u64>> {
    let timings = crate::build::Termination::parse(worker_message(pod)?)?.timings?;
    Some(
        timings
            .stages()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// The worker's outcome JSON; the kubelet may cut it at 4 KiB, so a cut message is `None`.
pub fn parse_termination_message(message: &str) -> Option<Outcome> {
    serde_json::from_str(message.trim()).ok()
}

/// Condition reasons beyond the pipeline's `FailureReason`s.
pub mod reasons {
    pub const QUEUED: &str = "Queued";
    pub const PENDING: &str = "Pending";
    pub const RUNNING: &str = "Running";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const CANCELLED: &str = "Cancelled";
    pub const TIMEOUT: &str = "Timeout";
    pub const OOM_KILLED: &str = "OOMKilled";
    pub const POD_EVICTED: &str = "PodEvicted";
    pub const POD_LOST: &str = "PodLost";
    pub const WORKER_FAILED: &str = "WorkerFailed";
    pub const NO_OUTCOME: &str = "NoOutcome";
    pub const POD_REJECTED: &str = "PodRejected";
    pub const POD_DISRUPTED: &str = "PodDisrupted";
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    pub const DELETED: &str = "Deleted";
}

// Requeue intervals.
/// QUEUED_RECHECK_SECONDS's default.
pub const QUEUED_RECHECK: Duration = Duration::from_secs(5);
/// How soon a callback owed right after the previous one of the same job looks again.
pub const SENDER_FINISHING: Duration = Duration::from_millis(200);
pub const ACTIVE_RECHECK: Duration = Duration::from_secs(60);
pub const TERMINATING_RECHECK: Duration = Duration::from_secs(5);

pub fn decide(input: &Inputs<'_>, settings: &Settings) -> Decision {
    let job = input.job;
    let now = input.now;
    let prev = job.status.clone().unwrap_or_default();
    let mut st = prev.clone();
    let mut actions = Vec::new();
    let mut events = Vec::new();
    let pod = classify(input.pod, now, settings.lost_pod_grace);
    let current_pod = pod_name(&job.name_any(), st.pod_retries);
    let deleting = job.metadata.deletion_timestamp.is_some();

    let finished = prev.phase.is_some_and(Phase::is_finished);
    if !finished {
        let stop = job.spec.cancelled || deleting;
        // A pod that ended keeps the worker's own outcome, unless something else ended it
        // (a drain, the controller's own stop): that would re-create it, for a build that
        // is to stop.
        let cancel_now = stop
            && (!matches!(pod, PodState::Ended(_) | PodState::SidecarHeld(_))
                || ended_by_disruption(&pod));
        if cancel_now {
            let started = !matches!(pod, PodState::Absent);
            if matches!(pod, PodState::Pending(_) | PodState::Running) {
                actions.push(Action::DeletePod {
                    name: current_pod.clone(),
                    force: false,
                });
            }
            stop_sidecar(input.pod, &pod, &current_pod, &mut actions);
            let (reason, msg) = match (deleting, started) {
                (true, _) => (
                    reasons::DELETED,
                    "the BuildJob was deleted while the build was on its way",
                ),
                (false, true) => (reasons::CANCELLED, "stopped by request"),
                (false, false) => (reasons::CANCELLED, "stopped by request before it started"),
            };
            finish_failed(&mut st, reason, msg, now, &mut events);
        } else {
            step(
                input,
                settings,
                &pod,
                &current_pod,
                &mut st,
                &mut actions,
                &mut events,
            );
        }
    }

    // The worker's own stage durations, from its termination message.
    if !finished && st.phase.is_some_and(Phase::is_finished) {
        if let Some(stages) = worker_stages(input.pod) {
            st.timings_mut().stages = stages;
        }
    }
    // Milestones for `status.timings`, in milliseconds after the BuildJob was created.
    if let Some(created) = job.creation_timestamp().map(|c| c.0) {
        let ms = u64::try_from(now.duration_since(created).as_millis()).ok();
        if st.phase == Some(Phase::Running) && prev.phase != Some(Phase::Running) {
            st.timings_mut()
                .pod_running_ms
                .get_or_insert(ms.unwrap_or(0));
        }
        if st.phase.is_some_and(Phase::is_finished) && !finished {
            st.timings_mut().worker_done_ms = ms;
        }
    }

    // Who ends the build's log, settled once as it ends: its worker wrote the outcome and
    // `Build finished` unless it never ran, left no outcome, or was stopped (Interrupted).
    if !finished && st.phase.is_some_and(Phase::is_finished) {
        st.log_ended = Some(st.phase == Some(Phase::Succeeded) || worker_ended_log(input.pod));
        if worker_left_log_unstored(input.pod) {
            st.log_copied = Some(false);
        }
    }
    // Callbacks: pending first, then the final one once the build has ended.
    if !st.callbacks.pending {
        actions.push(Action::SendCallback(CallbackKind::Pending));
    }
    let ended = st.phase.is_some_and(Phase::is_finished);
    if ended && !st.callbacks.final_ {
        let status = if st.phase == Some(Phase::Succeeded) {
            "succeeded"
        } else {
            "failed"
        };
        actions.push(Action::SendCallback(CallbackKind::Final(status)));
    }
    // Read from status, not from this reconcile: owed until recorded, across restarts.
    let log_end = log_owed(&st);
    if let Some(owed) = &log_end {
        actions.push(Action::EndLog(owed.clone()));
    }
    actions.extend(events.into_iter().map(Action::RecordEvent));

    let has_finalizer = job.finalizers().iter().any(|f| f == FINALIZER);
    // The log's end is owed like a callback: a deleted BuildJob is held until it is written
    // (and before a new build of the same number writes that stored log).
    let all_sent = ended && st.callbacks.pending && st.callbacks.final_ && log_end.is_none();
    // Nothing is owed once every callback is sent: let go at once, not at the TTL, so
    // deleting the namespace or the CRD (whose controller may go first) never hangs on it.
    if all_sent && has_finalizer {
        actions.push(Action::RemoveFinalizer);
    } else if !deleting && !has_finalizer && !all_sent {
        actions.push(Action::AddFinalizer);
    }
    if all_sent && !deleting {
        let done = st.completion_time.as_ref().map(|t| t.0).unwrap_or(now);
        let age = elapsed(done, now);
        if age >= settings.finished_ttl {
            actions.push(Action::DeleteJob);
        } else {
            actions.push(Action::Requeue(settings.finished_ttl - age));
        }
    }
    Decision {
        status: st,
        actions,
    }
}

/// The termination message the worker of `pod` left, if it has ended.
fn worker_message(pod: Option<&Pod>) -> Option<&str> {
    pod?.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == WORKER_CONTAINER)?
        .state
        .as_ref()?
        .terminated
        .as_ref()?
        .message
        .as_deref()
}

/// Whether the worker of `pod` said its log is not in storage: its pod's log is the only
/// copy left.
fn worker_left_log_unstored(pod: Option<&Pod>) -> bool {
    worker_message(pod)
        .and_then(crate::build::Termination::parse)
        .is_some_and(|t| t.log_stored == Some(false))
}

/// Whether the worker of `pod` wrote the end of the build's log: it left an outcome, and
/// not `Interrupted` (a stopped worker leaves the end to the controller).
fn worker_ended_log(pod: Option<&Pod>) -> bool {
    match worker_message(pod).and_then(parse_termination_message) {
        Some(Outcome::Failed { reason, .. }) => reason != crate::build::FailureReason::Interrupted,
        Some(Outcome::Succeeded { .. }) => true,
        None => false,
    }
}

/// What the controller still owes a build's stored log, from its status.
pub fn log_owed(st: &BuildJobStatus) -> Option<LogOwed> {
    let copy_pod_log = st.log_copied == Some(false);
    let end = (st.phase == Some(Phase::Failed) && st.log_ended == Some(false)).then(|| {
        let c = st.condition();
        LogEnd {
            reason: c.map_or_else(|| "Failed".into(), |c| c.reason.clone()),
            message: c.map(|c| c.message.clone()).unwrap_or_default(),
        }
    });
    (copy_pod_log || end.is_some()).then_some(LogOwed { copy_pod_log, end })
}

/// A build that has not ended: queue, start, watch, finish.
fn step(
    input: &Inputs<'_>,
    settings: &Settings,
    pod: &PodState,
    current_pod: &str,
    st: &mut BuildJobStatus,
    actions: &mut Vec<Action>,
    events: &mut Vec<EventNote>,
) {
    let now = input.now;
    let holds_slot = st.phase.is_some_and(Phase::holds_slot);
    match pod {
        PodState::Absent if !holds_slot => {
            let room = input.running + input.queued_ahead < settings.max_parallel;
            // Refused a moment ago (a full quota): trying again at once would spend the
            // retries before the quota can free up.
            match (room, refusal_wait(st, now)) {
                (true, Some(wait)) => actions.push(Action::Requeue(wait)),
                (true, None) => start_pod(st, current_pod, now, actions, events, None),
                (false, _) => {
                    if st.phase != Some(Phase::Queued) {
                        events.push(normal(
                            "Queued",
                            format!(
                                "waiting for a build slot ({} of {} running, {} queued ahead)",
                                input.running, settings.max_parallel, input.queued_ahead
                            ),
                        ));
                    }
                    st.phase = Some(Phase::Queued);
                    set_condition(
                        st,
                        "Unknown",
                        reasons::QUEUED,
                        "waiting for a build slot",
                        now,
                    );
                    actions.push(Action::Requeue(settings.queued_recheck));
                }
            }
        }
        PodState::Absent => retry_lost_pod(
            st,
            settings,
            current_pod,
            reasons::POD_LOST,
            "the worker pod disappeared",
            false,
            now,
            actions,
            events,
        ),
        // Deleted by someone else: wait for it to end (its outcome may still be a success)…
        PodState::Terminating { overdue: false } => {
            actions.push(Action::Requeue(TERMINATING_RECHECK))
        }
        // …unless its node is gone and nobody will ever finish the deletion.
        PodState::Terminating { overdue: true } => {
            actions.push(Action::DeletePod {
                name: current_pod.to_string(),
                force: true,
            });
            retry_lost_pod(
                st,
                settings,
                current_pod,
                reasons::POD_LOST,
                "the worker pod was still terminating long after its grace period (its node is gone)",
                false,
                now,
                actions,
                events,
            )
        }
        PodState::Pending(Some(problem)) if problem.fatal => {
            actions.push(Action::DeletePod {
                name: current_pod.to_string(),
                force: false,
            });
            st.pod_name = Some(current_pod.to_string());
            let msg = format!("the worker pod cannot start: {}", problem.message);
            finish_failed(st, &problem.reason, &msg, now, events);
        }
        PodState::Pending(Some(problem))
            if problem.unschedulable
                && elapsed(problem.pod_created.unwrap_or(now), now) >= settings.pending_limit =>
        {
            actions.push(Action::DeletePod {
                name: current_pod.to_string(),
                force: false,
            });
            let msg = format!(
                "the worker pod was not scheduled within {} s: {}",
                settings.pending_limit.as_secs(),
                problem.message
            );
            finish_failed(st, reasons::UNSCHEDULABLE, &msg, now, events);
        }
        PodState::Pending(_) | PodState::Running => {
            let running = matches!(pod, PodState::Running);
            let (phase, reason) = if running {
                (Phase::Running, reasons::RUNNING)
            } else {
                (Phase::Pending, reasons::PENDING)
            };
            if st.phase != Some(phase) {
                events.push(normal(
                    reason,
                    format!(
                        "worker pod {current_pod} is {}",
                        reason.to_ascii_lowercase()
                    ),
                ));
            }
            st.phase = Some(phase);
            st.pod_name = Some(current_pod.to_string());
            if st.start_time.is_none() {
                st.start_time = Some(Time(now));
            }
            match pod {
                // The scheduler's or kubelet's word is what an operator needs to see.
                PodState::Pending(Some(p)) => set_condition(
                    st,
                    "Unknown",
                    &p.reason,
                    &format!("worker pod {current_pod}: {}", p.message),
                    now,
                ),
                _ => set_condition(
                    st,
                    "Unknown",
                    reason,
                    &format!("worker pod {current_pod}"),
                    now,
                ),
            }
            let started = st.start_time.as_ref().map(|t| t.0).unwrap_or(now);
            let limit = settings.timeout + settings.stuck_grace;
            let age = elapsed(started, now);
            if age >= limit {
                actions.push(Action::DeletePod {
                    name: current_pod.to_string(),
                    force: false,
                });
                let msg = format!(
                    "the build ran longer than TIMEOUT_IN_MS ({} ms)",
                    settings.timeout.as_millis()
                );
                finish_failed(st, reasons::TIMEOUT, &msg, now, events);
            } else {
                let mut next = ACTIVE_RECHECK.min(limit - age);
                // A failing pull becomes fatal at a known time: decide then.
                if let PodState::Pending(Some(StartProblem {
                    fatal_in: Some(d), ..
                })) = pod
                {
                    next = next.min(*d);
                }
                actions.push(Action::Requeue(next));
            }
        }
        PodState::Ended(end) | PodState::SidecarHeld(end) => {
            st.pod_name = Some(current_pod.to_string());
            if st.start_time.is_none() {
                st.start_time = Some(Time(now));
            }
            match end {
                // The build outgrew its own pod's storage limits (an emptyDir's sizeLimit,
                // the containers' ephemeral-storage): another pod would do the same.
                PodEnd::Evicted(why) if outgrew_its_limits(why) => {
                    let msg = format!(
                        "the worker pod was evicted: {why} (the build needs more room: raise the worker pod's limits, WORKER_POD_OVERRIDES)"
                    );
                    finish_failed(st, reasons::POD_EVICTED, &msg, now, events)
                }
                PodEnd::Evicted(why) => {
                    let msg = format!("the worker pod was evicted: {why}");
                    retry_lost_pod(
                        st,
                        settings,
                        current_pod,
                        reasons::POD_EVICTED,
                        &msg,
                        true,
                        now,
                        actions,
                        events,
                    )
                }
                PodEnd::Disrupted(why) => {
                    let msg = format!("the worker pod was stopped by the cluster ({why})");
                    retry_lost_pod(
                        st,
                        settings,
                        current_pod,
                        reasons::POD_DISRUPTED,
                        &msg,
                        true,
                        now,
                        actions,
                        events,
                    )
                }
                PodEnd::DeadlineExceeded => {
                    let msg = format!(
                        "the build ran longer than TIMEOUT_IN_MS ({} ms)",
                        settings.timeout.as_millis()
                    );
                    finish_failed(st, reasons::TIMEOUT, &msg, now, events)
                }
                PodEnd::OomKilled => finish_failed(
                    st,
                    reasons::OOM_KILLED,
                    "the worker ran out of memory",
                    now,
                    events,
                ),
                PodEnd::Exited {
                    code,
                    reason,
                    outcome,
                } => match (code, outcome) {
                    (0, Some(Outcome::Succeeded { image, digest })) => {
                        st.phase = Some(Phase::Succeeded);
                        st.completion_time = Some(Time(now));
                        st.image = Some(image.clone());
                        st.digest = digest.clone();
                        set_condition(
                            st,
                            "True",
                            reasons::SUCCEEDED,
                            &format!("pushed {image}"),
                            now,
                        );
                        events.push(normal(reasons::SUCCEEDED, format!("pushed {image}")));
                    }
                    // SIGTERM from a drain or `kubectl delete pod`: not the build's fault.
                    (_, Some(Outcome::Failed { reason, message }))
                        if *reason == crate::build::FailureReason::Interrupted =>
                    {
                        let msg = format!("the worker was stopped: {message}");
                        retry_lost_pod(
                            st,
                            settings,
                            current_pod,
                            reasons::POD_DISRUPTED,
                            &msg,
                            true,
                            now,
                            actions,
                            events,
                        )
                    }
                    (_, Some(Outcome::Failed { reason, message })) => {
                        finish_failed(st, reason.as_str(), message, now, events)
                    }
                    (code, Some(Outcome::Succeeded { .. })) => {
                        let msg = format!(
                            "the worker reported success but exited with code {code} ({reason})"
                        );
                        finish_failed(st, reasons::WORKER_FAILED, &msg, now, events)
                    }
                    (0, None) => finish_failed(
                        st,
                        reasons::NO_OUTCOME,
                        "the worker exited 0 without writing its outcome to the termination log",
                        now,
                        events,
                    ),
                    (code, None) => {
                        let msg = format!(
                            "the worker exited with code {code} ({reason}) without an outcome"
                        );
                        finish_failed(st, reasons::WORKER_FAILED, &msg, now, events)
                    }
                },
            }
            stop_sidecar(input.pod, pod, current_pod, actions);
        }
    }
}

/// The sidecar that keeps an ended worker's pod running stops only with the pod: deleted,
/// unless its worker's log is to be copied from it first (the copier deletes it).
fn stop_sidecar(
    observed: Option<&Pod>,
    pod: &PodState,
    current_pod: &str,
    actions: &mut Vec<Action>,
) {
    let delete = Action::DeletePod {
        name: current_pod.to_string(),
        force: false,
    };
    if matches!(pod, PodState::SidecarHeld(_))
        && !worker_left_log_unstored(observed)
        && !actions.contains(&delete)
    {
        actions.push(delete);
    }
}

fn start_pod(
    st: &mut BuildJobStatus,
    name: &str,
    now: Timestamp,
    actions: &mut Vec<Action>,
    events: &mut Vec<EventNote>,
    note: Option<String>,
) {
    st.phase = Some(Phase::Pending);
    st.pod_name = Some(name.to_string());
    st.start_time = Some(Time(now));
    set_condition(
        st,
        "Unknown",
        reasons::PENDING,
        &format!("worker pod {name}"),
        now,
    );
    actions.push(Action::CreatePod {
        name: name.to_string(),
        attempt: st.pod_retries,
    });
    actions.push(Action::Requeue(ACTIVE_RECHECK));
    events.push(normal(
        "Started",
        note.unwrap_or_else(|| format!("created worker pod {name}")),
    ));
}

#[allow(clippy::too_many_arguments)]
fn retry_lost_pod(
    st: &mut BuildJobStatus,
    settings: &Settings,
    current_pod: &str,
    reason: &str,
    message: &str,
    pod_exists: bool,
    now: Timestamp,
    actions: &mut Vec<Action>,
    events: &mut Vec<EventNote>,
) {
    if st.pod_retries >= settings.max_pod_retries {
        let msg = format!("{message}; gave up after {} re-creations", st.pod_retries);
        finish_failed(st, reason, &msg, now, events);
        return;
    }
    if pod_exists {
        actions.push(Action::DeletePod {
            name: current_pod.to_string(),
            force: false,
        });
    }
    // Its re-creation was refused a moment ago (a full quota: during a drain the pods still
    // terminating count against it): wait out the backoff, as a first pod does.
    if let Some(wait) = refusal_wait(st, now) {
        actions.push(Action::Requeue(wait));
        return;
    }
    st.pod_retries += 1;
    let job = current_pod
        .rsplit_once("-worker-")
        .map(|(j, _)| j)
        .unwrap_or(current_pod);
    let next = pod_name(job, st.pod_retries);
    events.push(warning(
        reason,
        format!(
            "{message}; re-creating it ({}/{})",
            st.pod_retries, settings.max_pod_retries
        ),
    ));
    start_pod(
        st,
        &next,
        now,
        actions,
        events,
        Some(format!("created worker pod {next}")),
    );
}

/// What is left of the backoff after the last refusal of the worker pod, if anything.
fn refusal_wait(st: &BuildJobStatus, now: Timestamp) -> Option<Duration> {
    st.last_admission_refusal
        .as_ref()
        .and_then(|t| admission_backoff(st.admission_retries).checked_sub(elapsed(t.0, now)))
        .filter(|w| !w.is_zero())
}

/// How long after its `retries`th refusal (a full quota) the worker pod is tried again:
/// 10, 20, 40 s, …, at most 160 s.
pub fn admission_backoff(retries: u32) -> Duration {
    Duration::from_secs(5 << retries.clamp(1, 5))
}

/// The status after the API server (or the pod builder) refused the worker pod: the build
/// fails, as no retry can make the same pod acceptable.
pub fn reject(
    status: &BuildJobStatus,
    message: &str,
    now: Timestamp,
) -> (BuildJobStatus, EventNote) {
    let mut st = status.clone();
    let mut events = Vec::new();
    finish_failed(&mut st, reasons::POD_REJECTED, message, now, &mut events);
    // No worker ever ran: the controller writes the log's end.
    st.log_ended = Some(false);
    let note = events
        .pop()
        .unwrap_or_else(|| warning(reasons::POD_REJECTED, message.to_string()));
    (st, note)
}

fn finish_failed(
    st: &mut BuildJobStatus,
    reason: &str,
    message: &str,
    now: Timestamp,
    events: &mut Vec<EventNote>,
) {
    st.phase = Some(Phase::Failed);
    st.completion_time = Some(Time(now));
    set_condition(st, "False", reason, message, now);
    events.push(warning(reason, message.to_string()));
}

/// Sets the `Succeeded` condition, keeping its lastTransitionTime unless its status flips.
fn set_condition(
    st: &mut BuildJobStatus,
    status: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    let last = st
        .condition()
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    st.conditions.retain(|c| c.type_ != CONDITION_SUCCEEDED);
    st.conditions.push(BuildCondition {
        type_: CONDITION_SUCCEEDED.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Some(last),
    });
}

fn normal(reason: &str, note: String) -> EventNote {
    EventNote {
        warning: false,
        reason: reason.into(),
        note,
    }
}

fn warning(reason: &str, note: String) -> EventNote {
    EventNote {
        warning: true,
        reason: reason.into(),
        note,
    }
}

fn elapsed(from: Timestamp, to: Timestamp) -> Duration {
    Duration::try_from(to.duration_since(from)).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::build::FailureReason;
    use crate::operator::crd::{BuildJobSpec, CallbacksSent, SourceKind, SourceRef};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    pub const JOB: &str = "myapp-0b1c2d3e-aaaa-bbbb-cccc-111122223333-12";

    pub fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("valid")
    }

    pub fn job(phase: Option<Phase>) -> BuildJob {
        let spec = BuildJobSpec::from_build(
            &crate::build::tests::spec(),
            SourceRef {
                kind: SourceKind::Http,
                display: "https://x/y.tgz".into(),
                storage_key: None,
            },
        );
        let mut j = BuildJob::new(JOB, spec);
        j.metadata.namespace = Some("builds".into());
        j.metadata.uid = Some("uid-1".into());
        j.status = phase.map(|p| BuildJobStatus {
            phase: Some(p),
            start_time: p.holds_slot().then(|| Time(t(0))),
            pod_name: p.holds_slot().then(|| pod_name(JOB, 0)),
            callbacks: CallbacksSent {
                pending: true,
                final_: false,
                in_flight: None,
            },
            ..Default::default()
        });
        j.metadata.finalizers = Some(vec![FINALIZER.into()]);
        j
    }

    fn settings() -> Settings {
        Settings {
            max_parallel: 2,
            max_pod_retries: 2,
            finished_ttl: Duration::from_secs(3600),
            timeout: Duration::from_secs(1200),
            stuck_grace: Duration::from_secs(120),
            pending_limit: Duration::from_secs(600),
            max_admission_retries: 3,
            lost_pod_grace: Duration::from_secs(60),
            queued_recheck: QUEUED_RECHECK,
        }
    }

    pub fn pod(phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(pod_name(JOB, 0)),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub fn ended_pod(
        phase: &str,
        pod_reason: Option<&str>,
        code: i32,
        reason: &str,
        message: Option<&str>,
    ) -> Pod {
        let mut p = pod(phase);
        if let Some(s) = p.status.as_mut() {
            s.reason = pod_reason.map(str::to_string);
            s.container_statuses = Some(vec![ContainerStatus {
                name: WORKER_CONTAINER.into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: code,
                        reason: Some(reason.into()),
                        message: message.map(str::to_string),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]);
        }
        p
    }

    pub fn success_message() -> String {
        serde_json::to_string(&Outcome::Succeeded {
            image: "r/a:1.12".into(),
            digest: Some("sha256:abc".into()),
        })
        .expect("json")
    }

    fn run(
        job: &BuildJob,
        pod: Option<&Pod>,
        running: usize,
        ahead: usize,
        now: Timestamp,
    ) -> Decision {
        decide(
            &Inputs {
                job,
                pod,
                running,
                queued_ahead: ahead,
                now,
            },
            &settings(),
        )
    }

    fn has(d: &Decision, f: impl Fn(&Action) -> bool) -> bool {
        d.actions.iter().any(f)
    }

    fn reason(d: &Decision) -> String {
        d.status
            .condition()
            .map(|c| c.reason.clone())
            .unwrap_or_default()
    }

    fn creates(d: &Decision) -> bool {
        has(d, |a| matches!(a, Action::CreatePod { .. }))
    }

    fn deletes(d: &Decision) -> bool {
        has(d, |a| matches!(a, Action::DeletePod { .. }))
    }

    fn final_cb(d: &Decision) -> Option<&'static str> {
        d.actions.iter().find_map(|a| match a {
            Action::SendCallback(CallbackKind::Final(s)) => Some(*s),
            _ => None,
        })
    }

    #[test]
    fn a_new_job_with_a_free_slot_gets_a_pod_and_a_pending_callback() {
        let j = job(None);
        let d = run(&j, None, 0, 0, t(1));
        assert_eq!(d.status.phase, Some(Phase::Pending));
        assert!(has(&d, |a| *a
            == Action::CreatePod {
                name: pod_name(JOB, 0),
                attempt: 0
            }));
        assert_eq!(
            d.actions
                .iter()
                .filter(|a| **a == Action::SendCallback(CallbackKind::Pending))
                .count(),
            1
        );
        assert_eq!(
            d.status.pod_name.as_deref(),
            Some(pod_name(JOB, 0).as_str())
        );
        assert_eq!(d.status.start_time, Some(Time(t(1))));
        assert!(!d.status.callbacks.pending, "recorded only after delivery");
    }

    #[test]
    fn queue_full_waits_and_queue_free_starts_oldest_first() {
        let j = job(None);
        let full = run(&j, None, 2, 0, t(1));
        assert_eq!(full.status.phase, Some(Phase::Queued));
        assert!(!creates(&full));
        assert!(has(&full, |a| *a == Action::Requeue(QUEUED_RECHECK)));
        assert!(has(
            &full,
            |a| matches!(a, Action::RecordEvent(e) if e.reason == "Queued")
        ));

        let queued = job(Some(Phase::Queued));
        // One slot free but an older queued build takes it.
        let behind = run(&queued, None, 1, 1, t(2));
        assert_eq!(behind.status.phase, Some(Phase::Queued));
        assert!(!creates(&behind));
        assert!(
            !has(&behind, |a| matches!(a, Action::RecordEvent(_))),
            "no event when nothing changed"
        );
        // First in line with a free slot: starts.
        let first = run(&queued, None, 1, 0, t(3));
        assert!(creates(&first));
        assert_eq!(first.status.phase, Some(Phase::Pending));
    }

    #[test]
    fn pending_and_running_pods_move_the_phase_without_side_effects() {
        let j = job(Some(Phase::Pending));
        let d = run(&j, Some(&pod("Pending")), 5, 5, t(10));
        assert_eq!(d.status.phase, Some(Phase::Pending));
        assert!(!creates(&d) && !deletes(&d));
        assert!(!has(&d, |a| matches!(a, Action::RecordEvent(_))));
        let d = run(&j, Some(&pod("Running")), 5, 5, t(10));
        assert_eq!(d.status.phase, Some(Phase::Running));
        assert!(has(
            &d,
            |a| matches!(a, Action::RecordEvent(e) if e.reason == "Running")
        ));
        assert!(has(&d, |a| *a == Action::Requeue(ACTIVE_RECHECK)));
        let r = job(Some(Phase::Running));
        let d = run(&r, Some(&pod("Running")), 0, 0, t(10));
        assert!(!has(&d, |a| matches!(a, Action::RecordEvent(_))));
    }

    #[test]
    fn a_pod_seen_before_the_status_was_written_is_adopted_not_duplicated() {
        let j = job(None);
        let d = run(&j, Some(&pod("Running")), 4, 4, t(1));
        assert!(!creates(&d));
        assert_eq!(d.status.phase, Some(Phase::Running));
    }

    #[test]
    fn succeeded_with_termination_message_succeeds() {
        let msg = success_message();
        let p = ended_pod("Succeeded", None, 0, "Completed", Some(&msg));
        for phase in [Phase::Pending, Phase::Running] {
            let d = run(&job(Some(phase)), Some(&p), 0, 0, t(50));
            assert_eq!(d.status.phase, Some(Phase::Succeeded));
            assert_eq!(d.status.image.as_deref(), Some("r/a:1.12"));
            assert_eq!(d.status.digest.as_deref(), Some("sha256:abc"));
            assert_eq!(
                d.status.condition().map(|c| c.status.as_str()),
                Some("True")
            );
            assert_eq!(final_cb(&d), Some("succeeded"));
            assert_eq!(d.status.completion_time, Some(Time(t(50))));
        }
    }

    #[test]
    fn succeeded_without_termination_message_is_not_assumed_a_success() {
        for msg in [None, Some("not json"), Some("{\"result\":\"succ")] {
            let p = ended_pod("Succeeded", None, 0, "Completed", msg);
            let d = run(&job(Some(Phase::Running)), Some(&p), 0, 0, t(50));
            assert_eq!(d.status.phase, Some(Phase::Failed), "{msg:?}");
            assert_eq!(reason(&d), reasons::NO_OUTCOME);
            assert_eq!(final_cb(&d), Some("failed"));
        }
    }

    #[test]
    fn failed_pods_carry_the_workers_reason() {
        let msg = serde_json::to_string(&Outcome::failed(FailureReason::PushFailed, "denied"))
            .expect("json");
        let p = ended_pod("Failed", None, 1, "Error", Some(&msg));
        let d = run(&job(Some(Phase::Running)), Some(&p), 0, 0, t(9));
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(reason(&d), "PushFailed");
        assert_eq!(
            d.status.condition().map(|c| c.message.as_str()),
            Some("denied")
        );

        let p = ended_pod("Failed", None, 2, "Error", None);
        let d = run(&job(Some(Phase::Running)), Some(&p), 0, 0, t(9));
        assert_eq!(reason(&d), reasons::WORKER_FAILED);

        let ok = success_message();
        let p = ended_pod("Failed", None, 1, "Error", Some(&ok));
        let d = run(&job(Some(Phase::Running)), Some(&p), 0, 0, t(9));
        assert_eq!(
            d.status.phase,
            Some(Phase::Failed),
            "a non-zero exit is never a success"
        );

        let src = serde_json::to_string(&Outcome::failed(FailureReason::SourceFetchFailed, "404"))
            .expect("json");
        let p = ended_pod("Failed", None, 1, "Error", Some(&src));
        assert_eq!(
            reason(&run(&job(Some(Phase::Pending)), Some(&p), 0, 0, t(9))),
            "SourceFetchFailed"
        );
    }

    #[test]
    fn oom_and_deadline_are_named() {
        let p = ended_pod("Failed", None, 137, "OOMKilled", None);
        let d = run(&job(Some(Phase::Running)), Some(&p), 0, 0, t(9));
        assert_eq!(reason(&d), reasons::OOM_KILLED);
        let mut p = pod("Failed");
        if let Some(s) = p.status.as_mut() {
            s.reason = Some("DeadlineExceeded".into());
        }
        let d = run(&job(Some(Phase::Running)), Some(&p), 0, 0, t(9));
        assert_eq!(reason(&d), reasons::TIMEOUT);
        assert_eq!(final_cb(&d), Some("failed"));
    }

    #[test]
    fn evicted_pods_are_recreated_a_bounded_number_of_times() {
        let mut p = pod("Failed");
        if let Some(s) = p.status.as_mut() {
            s.reason = Some("Evicted".into());
            s.message = Some("node low on memory".into());
        }
        let j = job(Some(Phase::Running));
        let d = run(&j, Some(&p), 3, 3, t(9));
        assert!(has(&d, |a| *a
            == Action::DeletePod {
                name: pod_name(JOB, 0),
                force: false
            }));
        assert!(has(&d, |a| *a
            == Action::CreatePod {
                name: pod_name(JOB, 1),
                attempt: 1
            }));
        assert_eq!(d.status.pod_retries, 1);
        assert_eq!(d.status.phase, Some(Phase::Pending));
        assert!(final_cb(&d).is_none());
        assert!(has(
            &d,
            |a| matches!(a, Action::RecordEvent(e) if e.warning && e.reason == reasons::POD_EVICTED)
        ));

        let mut exhausted = job(Some(Phase::Running));
        if let Some(s) = exhausted.status.as_mut() {
            s.pod_retries = 2;
        }
        let d = run(&exhausted, Some(&p), 0, 0, t(9));
        assert!(!creates(&d));
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(reason(&d), reasons::POD_EVICTED);
    }

    #[test]
    fn a_deleted_pod_is_recreated_then_given_up_on() {
        let d = run(&job(Some(Phase::Running)), None, 0, 0, t(9));
        assert!(has(&d, |a| *a
            == Action::CreatePod {
                name: pod_name(JOB, 1),
                attempt: 1
            }));
        assert!(!deletes(&d));
        let mut j = job(Some(Phase::Pending));
        if let Some(s) = j.status.as_mut() {
            s.pod_retries = 2;
        }
        let d = run(&j, None, 0, 0, t(9));
        assert_eq!(reason(&d), reasons::POD_LOST);
    }

    #[test]
    fn a_terminating_pod_is_waited_for() {
        let mut p = pod("Running");
        p.metadata.deletion_timestamp = Some(Time(t(0)));
        let d = run(&job(Some(Phase::Running)), Some(&p), 0, 0, t(9));
        assert_eq!(d.actions, vec![Action::Requeue(TERMINATING_RECHECK)]);
    }

    #[test]
    fn a_pod_stuck_past_the_timeout_is_deleted_and_timed_out() {
        let d = run(
            &job(Some(Phase::Pending)),
            Some(&pod("Pending")),
            0,
            0,
            t(1200 + 120),
        );
        assert!(deletes(&d));
        assert_eq!(reason(&d), reasons::TIMEOUT);
        let d = run(
            &job(Some(Phase::Pending)),
            Some(&pod("Pending")),
            0,
            0,
            t(1200 + 119),
        );
        assert!(!deletes(&d));
        assert!(has(&d, |a| *a == Action::Requeue(Duration::from_secs(1))));
    }

    #[test]
    fn cancel_at_each_phase() {
        let mut new = job(None);
        new.spec.cancelled = true;
        let d = run(&new, None, 0, 0, t(1));
        assert!(!creates(&d) && !deletes(&d));
        assert_eq!(reason(&d), reasons::CANCELLED);
        assert_eq!(
            d.actions[..2],
            [
                Action::SendCallback(CallbackKind::Pending),
                Action::SendCallback(CallbackKind::Final("failed"))
            ]
        );

        for (phase, pod_state) in [
            (Phase::Queued, None),
            (Phase::Pending, Some("Pending")),
            (Phase::Running, Some("Running")),
        ] {
            let mut j = job(Some(phase));
            j.spec.cancelled = true;
            let p = pod_state.map(pod);
            let d = run(&j, p.as_ref(), 0, 0, t(5));
            assert_eq!(d.status.phase, Some(Phase::Failed), "{phase:?}");
            assert_eq!(reason(&d), reasons::CANCELLED);
            assert_eq!(deletes(&d), p.is_some(), "{phase:?}");
            assert!(!creates(&d));
            assert_eq!(final_cb(&d), Some("failed"));
        }

        // A pod that already ended keeps its real outcome.
        let mut j = job(Some(Phase::Running));
        j.spec.cancelled = true;
        let msg = success_message();
        let d = run(
            &j,
            Some(&ended_pod("Succeeded", None, 0, "Completed", Some(&msg))),
            0,
            0,
            t(5),
        );
        assert_eq!(d.status.phase, Some(Phase::Succeeded));

        // A pod a drain (or this stop's own deletion) ended meanwhile: stopped, never
        // re-created.
        let interrupted = serde_json::to_string(&Outcome::failed(
            FailureReason::Interrupted,
            "the worker was asked to stop (SIGTERM)",
        ))
        .expect("json");
        for (p, deleted) in [
            (
                ended_pod("Failed", Some("NodeShutdown"), 137, "Error", None),
                false,
            ),
            (
                ended_pod("Failed", None, 1, "Error", Some(&interrupted)),
                false,
            ),
            (
                ended_pod("Failed", Some("Evicted"), 137, "Error", None),
                true,
            ),
        ] {
            let mut j = job(Some(Phase::Running));
            j.spec.cancelled = !deleted;
            if deleted {
                j.metadata.deletion_timestamp = Some(Time(t(1)));
            }
            let d = run(&j, Some(&p), 0, 0, t(5));
            assert_eq!(d.status.phase, Some(Phase::Failed));
            assert_eq!(
                reason(&d),
                if deleted {
                    reasons::DELETED
                } else {
                    reasons::CANCELLED
                }
            );
            assert!(!creates(&d), "{:?}", d.actions);
            assert_eq!(d.status.pod_retries, 0);
            assert_eq!(final_cb(&d), Some("failed"));
        }

        // Cancelling a finished build changes nothing.
        for phase in [Phase::Succeeded, Phase::Failed] {
            let mut j = job(Some(phase));
            if let Some(s) = j.status.as_mut() {
                s.callbacks.final_ = true;
                s.completion_time = Some(Time(t(0)));
            }
            j.spec.cancelled = true;
            let d = run(&j, None, 0, 0, t(5));
            assert_eq!(d.status, j.status.clone().unwrap_or_default());
            assert!(!deletes(&d));
        }
    }

    #[test]
    fn a_restarted_controller_does_not_repeat_delivered_callbacks() {
        let mut j = job(Some(Phase::Failed));
        if let Some(s) = j.status.as_mut() {
            s.callbacks = CallbacksSent {
                pending: true,
                final_: true,
                in_flight: None,
            };
            s.completion_time = Some(Time(t(0)));
        }
        j.metadata.finalizers = None;
        let d = run(&j, None, 0, 0, t(10));
        assert!(!has(&d, |a| matches!(a, Action::SendCallback(_))));
        assert_eq!(d.actions, vec![Action::Requeue(Duration::from_secs(3590))]);

        // Final not yet sent (the controller died between the status write and the send).
        let mut j = job(Some(Phase::Succeeded));
        if let Some(s) = j.status.as_mut() {
            s.completion_time = Some(Time(t(0)));
        }
        let d = run(&j, None, 0, 0, t(10));
        assert_eq!(
            d.actions,
            vec![Action::SendCallback(CallbackKind::Final("succeeded"))]
        );

        // Neither sent: pending goes first.
        if let Some(s) = j.status.as_mut() {
            s.callbacks.pending = false;
        }
        let d = run(&j, None, 0, 0, t(10));
        assert_eq!(
            d.actions,
            vec![
                Action::SendCallback(CallbackKind::Pending),
                Action::SendCallback(CallbackKind::Final("succeeded"))
            ]
        );
    }

    #[test]
    fn a_rejected_pod_fails_the_build_and_then_owes_the_callbacks() {
        let j = job(None);
        let (st, note) = reject(&BuildJobStatus::default(), "bad image", t(3));
        assert_eq!(st.phase, Some(Phase::Failed));
        assert_eq!(
            st.condition().map(|c| c.reason.as_str()),
            Some(reasons::POD_REJECTED)
        );
        assert!(note.warning);
        let mut j2 = j;
        j2.status = Some(st);
        let d = run(&j2, None, 0, 0, t(4));
        assert_eq!(
            d.actions,
            vec![
                Action::SendCallback(CallbackKind::Pending),
                Action::SendCallback(CallbackKind::Final("failed")),
                // No worker ran: the controller ends its log.
                Action::EndLog(LogOwed {
                    copy_pod_log: false,
                    end: Some(LogEnd {
                        reason: reasons::POD_REJECTED.into(),
                        message: "bad image".into()
                    })
                }),
            ]
        );
    }

    #[test]
    fn a_refused_pod_is_tried_again_only_after_its_backoff() {
        assert_eq!(
            [1, 2, 3, 9].map(admission_backoff),
            [10, 20, 40, 160].map(Duration::from_secs)
        );
        let mut j = job(None);
        j.status = Some(BuildJobStatus {
            callbacks: CallbacksSent {
                pending: true,
                ..Default::default()
            },
            admission_retries: 2,
            last_admission_refusal: Some(Time(t(100))),
            ..Default::default()
        });
        // The status write that recorded the refusal wakes the job at once: it waits.
        let d = run(&j, None, 0, 0, t(101));
        assert!(!creates(&d));
        assert_eq!(d.actions, vec![Action::Requeue(Duration::from_secs(19))]);
        assert_eq!(
            d.status,
            j.status.clone().unwrap_or_default(),
            "nothing to write"
        );
        // Its backoff over: the pod is tried again.
        let d = run(&j, None, 0, 0, t(120));
        assert!(creates(&d));
        // No slot meanwhile: it queues as any other.
        let d = run(&j, None, 2, 0, t(101));
        assert_eq!(d.status.phase, Some(Phase::Queued));
    }

    #[test]
    fn finished_jobs_are_deleted_after_the_ttl() {
        let mut j = job(Some(Phase::Succeeded));
        if let Some(s) = j.status.as_mut() {
            s.callbacks.final_ = true;
            s.completion_time = Some(Time(t(0)));
        }
        // Its finalizer went when its last callback was sent.
        j.metadata.finalizers = None;
        assert_eq!(
            run(&j, None, 0, 0, t(3600)).actions,
            vec![Action::DeleteJob]
        );
    }

    #[test]
    fn conditions_keep_their_transition_time_unless_the_status_flips() {
        let j = job(None);
        let queued = run(&j, None, 9, 0, t(1));
        let mut j2 = job(None);
        j2.status = Some(queued.status.clone());
        // Queued → Pending: both Unknown, the time stays.
        let started = run(&j2, None, 0, 0, t(50));
        let c = started
            .status
            .condition()
            .cloned()
            .unwrap_or_else(|| panic!("condition"));
        assert_eq!(c.reason, reasons::PENDING);
        assert_eq!(c.last_transition_time, Some(Time(t(1))));
        // Pending → Succeeded: flips, new time.
        j2.status = Some(started.status.clone());
        let msg = success_message();
        let done = run(
            &j2,
            Some(&ended_pod("Succeeded", None, 0, "Completed", Some(&msg))),
            0,
            0,
            t(90),
        );
        assert_eq!(
            done.status
                .condition()
                .and_then(|c| c.last_transition_time.clone()),
            Some(Time(t(90)))
        );
    }

    #[test]
    fn a_steady_state_is_a_fixed_point() {
        // Deciding again from the status just decided changes nothing but timestamps.
        let mut j = job(Some(Phase::Running));
        let first = run(&j, Some(&pod("Running")), 0, 0, t(10));
        j.status = Some(first.status.clone());
        let second = run(&j, Some(&pod("Running")), 0, 0, t(70));
        assert_eq!(
            first.status.without_timestamps(),
            second.status.without_timestamps()
        );
        assert_eq!(first.status, second.status);
    }

    fn with_condition(mut p: Pod, type_: &str, reason: &str, message: &str) -> Pod {
        use k8s_openapi::api::core::v1::PodCondition;
        if let Some(s) = p.status.as_mut() {
            s.conditions
                .get_or_insert_with(Vec::new)
                .push(PodCondition {
                    type_: type_.into(),
                    status: if type_ == "PodScheduled" {
                        "False"
                    } else {
                        "True"
                    }
                    .into(),
                    reason: Some(reason.into()),
                    message: Some(message.into()),
                    ..Default::default()
                });
        }
        p
    }

    fn waiting(reason: &str, message: &str) -> Pod {
        use k8s_openapi::api::core::v1::ContainerStateWaiting;
        let mut p = pod("Pending");
        if let Some(s) = p.status.as_mut() {
            s.container_statuses = Some(vec![ContainerStatus {
                name: WORKER_CONTAINER.into(),
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.into()),
                        message: Some(message.into()),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]);
        }
        p
    }

    #[test]
    fn a_disrupted_pod_is_recreated_whatever_the_worker_said() {
        // Drain / Eviction API / preemption: DisruptionTarget, and the worker got SIGTERM.
        let interrupted = serde_json::to_string(&Outcome::failed(
            FailureReason::Interrupted,
            "the worker was asked to stop (SIGTERM)",
        ))
        .expect("json");
        let drained = with_condition(
            ended_pod("Failed", None, 1, "Error", Some(&interrupted)),
            "DisruptionTarget",
            "EvictionByEvictionAPI",
            "Eviction API: evicting",
        );
        let plain_sigterm = ended_pod("Failed", None, 1, "Error", Some(&interrupted));
        let shutdown = ended_pod("Failed", Some("NodeShutdown"), 137, "Error", None);
        // A node that crashed or rebooted: no graceful shutdown, no condition.
        let lost = ended_pod("Failed", None, 137, "ContainerStatusUnknown", None);
        let reboot = ended_pod("Failed", None, 255, "Unknown", None);
        for p in [drained, plain_sigterm, shutdown, lost, reboot] {
            let d = run(&job(Some(Phase::Running)), Some(&p), 0, 0, t(9));
            assert_eq!(d.status.pod_retries, 1, "{:?}", d.status);
            assert!(has(&d, |a| *a
                == Action::CreatePod {
                    name: pod_name(JOB, 1),
                    attempt: 1
                }));
            assert!(final_cb(&d).is_none());
            assert!(has(
                &d,
                |a| matches!(a, Action::RecordEvent(e) if e.reason == reasons::POD_DISRUPTED)
            ));
        }
    }

    #[test]
    fn a_pod_its_node_refused_to_admit_is_recreated() {
        // The kubelet refuses a pod the scheduler placed (`OutOf{resource}` for any resource,
        // or another of its admission reasons): phase Failed, no container ever ran.
        for why in [
            "OutOfpods",
            "OutOfephemeral-storage",
            "OutOfhugepages-2Mi",
            "TaintToleration",
            "PodOSSelectorNodeLabelDoesNotMatch",
        ] {
            let mut p = pod("Failed");
            if let Some(s) = p.status.as_mut() {
                s.reason = Some(why.into());
                s.message = Some(format!("Pod was rejected: {why}"));
            }
            for phase in [Phase::Pending, Phase::Running] {
                let d = run(&job(Some(phase)), Some(&p), 0, 0, t(9));
                assert!(
                    has(&d, |a| *a
                        == Action::CreatePod {
                            name: pod_name(JOB, 1),
                            attempt: 1
                        }),
                    "{why}: {d:?}"
                );
                assert!(final_cb(&d).is_none(), "{why}");
            }
        }
    }

    #[test]
    fn a_sidecar_that_keeps_crashing_fails_the_build_after_a_few_restarts() {
        let looping = |restarts: i32| {
            let mut p = pod("Pending");
            if let Some(s) = p.status.as_mut() {
                s.init_container_statuses = Some(vec![ContainerStatus {
                    name: "dind".into(),
                    restart_count: restarts,
                    state: Some(ContainerState {
                        waiting: Some(k8s_openapi::api::core::v1::ContainerStateWaiting {
                            reason: Some("CrashLoopBackOff".into()),
                            message: Some("back-off 40s restarting failed container=dind".into()),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]);
            }
            p
        };
        let d = run(&job(Some(Phase::Pending)), Some(&looping(1)), 0, 0, t(20));
        assert_eq!(d.status.phase, Some(Phase::Pending));
        let d = run(&job(Some(Phase::Pending)), Some(&looping(3)), 0, 0, t(60));
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(reason(&d), "CrashLoopBackOff");
        assert!(deletes(&d));
        assert_eq!(final_cb(&d), Some("failed"));
    }

    #[test]
    fn a_build_that_outgrew_its_pods_storage_fails_without_a_retry() {
        for why in [
            "Usage of EmptyDir volume \"docker\" exceeds the limit \"20Gi\". ",
            "Container worker exceeded its local ephemeral storage limit \"10Gi\". ",
            "Pod ephemeral local storage usage exceeds the total limit of containers 10Gi. ",
        ] {
            let mut p = ended_pod("Failed", Some("Evicted"), 137, "Error", None);
            if let Some(s) = p.status.as_mut() {
                s.message = Some(why.into());
            }
            let d = run(&job(Some(Phase::Running)), Some(&p), 0, 0, t(10));
            assert_eq!(d.status.phase, Some(Phase::Failed), "{why}");
            assert_eq!(reason(&d), reasons::POD_EVICTED);
            assert!(!creates(&d), "{why}");
            assert_eq!(final_cb(&d), Some("failed"));
        }
        // A node short of room is not the build's doing: it runs again elsewhere.
        let mut p = ended_pod("Failed", Some("Evicted"), 137, "Error", None);
        if let Some(s) = p.status.as_mut() {
            s.message = Some("The node was low on resource: ephemeral-storage. Threshold quantity: 2Gi, available: 1Gi. ".into());
        }
        let d = run(&job(Some(Phase::Running)), Some(&p), 0, 0, t(10));
        assert!(creates(&d));
    }

    #[test]
    fn a_pod_recreation_refused_by_a_quota_waits_out_its_backoff() {
        // The pod was lost (an eviction), its re-creation refused a moment ago: the status
        // as the controller wrote it then (the build's, plus the refusal).
        let mut j = job(Some(Phase::Running));
        if let Some(st) = j.status.as_mut() {
            st.admission_retries = 1;
            st.last_admission_refusal = Some(Time(t(100)));
        }
        let evicted = ended_pod("Failed", Some("Evicted"), 137, "Error", None);
        for p in [None, Some(&evicted)] {
            let d = run(&j, p, 0, 0, t(101));
            assert!(!has(&d, |a| matches!(a, Action::CreatePod { .. })), "{d:?}");
            let wait = admission_backoff(1) - Duration::from_secs(1);
            assert!(has(&d, |a| *a == Action::Requeue(wait)), "{d:?}");
            assert_eq!(d.status.pod_retries, 0);
            assert!(final_cb(&d).is_none());
        }
        // Once it has passed, the pod is made again.
        let later = t(100 + admission_backoff(1).as_secs() as i64);
        let d = run(&j, None, 0, 0, later);
        assert!(has(&d, |a| matches!(a, Action::CreatePod { .. })), "{d:?}");
    }

    #[test]
    fn a_pod_deleted_by_someone_else_is_waited_for_then_given_up_as_lost() {
        let mut p = pod("Running");
        p.metadata.deletion_timestamp = Some(Time(t(30)));
        let wait = run(&job(Some(Phase::Running)), Some(&p), 0, 0, t(40));
        assert_eq!(wait.actions, vec![Action::Requeue(TERMINATING_RECHECK)]);
        assert_eq!(
            wait.status.phase,
            Some(Phase::Running),
            "still holds its slot"
        );
        // Its node is gone: nobody finishes the deletion. Force it and go on.
        let lost = run(&job(Some(Phase::Running)), Some(&p), 0, 0, t(30 + 61));
        assert!(has(&lost, |a| *a
            == Action::DeletePod {
                name: pod_name(JOB, 0),
                force: true
            }));
        assert!(creates(&lost));
        assert_eq!(lost.status.pod_retries, 1);
        // Out of retries: the build fails and the slot is free.
        let mut spent = job(Some(Phase::Running));
        if let Some(s) = spent.status.as_mut() {
            s.pod_retries = 2;
        }
        let mut p2 = p.clone();
        p2.metadata.name = Some(pod_name(JOB, 2));
        let d = run(&spent, Some(&p2), 0, 0, t(30 + 61));
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(reason(&d), reasons::POD_LOST);
        assert_eq!(final_cb(&d), Some("failed"));
    }

    #[test]
    fn a_pod_that_can_never_start_fails_fast_with_the_kubelets_reason() {
        for (r, words) in [
            ("InvalidImageName", "the kubelet's words"),
            (
                "CreateContainerConfigError",
                "secret \"bs-env\" not found (the kubelet's words)",
            ),
        ] {
            let p = waiting(r, words);
            let d = run(&job(Some(Phase::Pending)), Some(&p), 0, 0, t(5));
            assert_eq!(d.status.phase, Some(Phase::Failed), "{r}");
            assert_eq!(reason(&d), r);
            let msg = d
                .status
                .condition()
                .map(|c| c.message.clone())
                .unwrap_or_default();
            assert!(msg.contains("the kubelet's words"), "{msg}");
            assert!(deletes(&d));
            assert_eq!(final_cb(&d), Some("failed"));
        }
        // A first pull failure may be a blip: the kubelet retries, so does the build.
        let d = run(
            &job(Some(Phase::Pending)),
            Some(&waiting("ErrImagePull", "x")),
            0,
            0,
            t(5),
        );
        assert_eq!(d.status.phase, Some(Phase::Pending));
        assert_eq!(reason(&d), "ErrImagePull");
        assert!(final_cb(&d).is_none());
    }

    #[test]
    fn a_container_create_that_may_pass_is_waited_out_for_a_while_then_fails() {
        for (r, words) in [
            (
                "CreateContainerConfigError",
                "failed to sync secret cache: timed out waiting for the condition",
            ),
            (
                "CreateContainerError",
                "failed to reserve container name \"worker_x\": name \"worker_x\" is reserved",
            ),
        ] {
            let mut p = waiting(r, words);
            p.metadata.creation_timestamp = Some(Time(t(0)));
            let d = run(&job(Some(Phase::Pending)), Some(&p), 0, 0, t(5));
            assert_eq!(d.status.phase, Some(Phase::Pending), "{r}");
            assert!(!deletes(&d) && final_cb(&d).is_none(), "{r}");
            // It looks again when the wait would be over.
            let d = run(&job(Some(Phase::Pending)), Some(&p), 0, 0, t(100));
            assert!(
                has(&d, |a| *a == Action::Requeue(Duration::from_secs(20))),
                "{r}"
            );
            let d = run(&job(Some(Phase::Pending)), Some(&p), 0, 0, t(130));
            assert_eq!(d.status.phase, Some(Phase::Failed), "{r}");
            assert_eq!(reason(&d), r);
            assert_eq!(final_cb(&d), Some("failed"));
        }
    }

    #[test]
    fn a_failing_image_pull_is_waited_out_for_a_while_then_fails() {
        let backoff = |created: i64| {
            let mut p = waiting(
                "ImagePullBackOff",
                "Back-off pulling image \"r/w:1\": ErrImagePull: 429 Too Many Requests - \
                 Server message: toomanyrequests: You have reached your pull rate limit",
            );
            p.metadata.creation_timestamp = Some(Time(t(created)));
            p
        };
        // A rate limit a few seconds in: the kubelet retries, the build waits.
        let d = run(&job(Some(Phase::Pending)), Some(&backoff(0)), 0, 0, t(5));
        assert_eq!(d.status.phase, Some(Phase::Pending));
        assert_eq!(reason(&d), "ImagePullBackOff");
        assert!(!deletes(&d) && final_cb(&d).is_none());
        // It looks again when the wait would be over.
        let d = run(&job(Some(Phase::Pending)), Some(&backoff(0)), 0, 0, t(100));
        assert_eq!(d.status.phase, Some(Phase::Pending));
        assert!(has(&d, |a| *a == Action::Requeue(Duration::from_secs(20))));
        // Still failing past IMAGE_PULL_PATIENCE: the build fails with the kubelet's words.
        let d = run(&job(Some(Phase::Pending)), Some(&backoff(0)), 0, 0, t(180));
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(reason(&d), "ImagePullBackOff");
        let msg = d
            .status
            .condition()
            .map(|c| c.message.clone())
            .unwrap_or_default();
        assert!(msg.contains("toomanyrequests"), "{msg}");
        assert!(deletes(&d));
        assert_eq!(final_cb(&d), Some("failed"));
        // The wait counts from when the pod reached a node, not from its creation.
        let mut late = backoff(0);
        if let Some(s) = late.status.as_mut() {
            s.conditions = Some(vec![k8s_openapi::api::core::v1::PodCondition {
                type_: "PodScheduled".into(),
                status: "True".into(),
                last_transition_time: Some(Time(t(100))),
                ..Default::default()
            }]);
        }
        let d = run(&job(Some(Phase::Pending)), Some(&late), 0, 0, t(180));
        assert_eq!(d.status.phase, Some(Phase::Pending));
        // A missing image or missing rights do not pass by waiting: fail at once.
        for (r, m) in [
            (
                "ErrImagePull",
                "rpc error: code = NotFound desc = failed to pull and unpack image \
                 \"r/w:1\": failed to resolve reference \"r/w:1\": r/w:1: not found",
            ),
            (
                "ImagePullBackOff",
                "Back-off pulling image \"r/w:1\": ErrImagePull: manifest unknown",
            ),
            ("ErrImagePull", "failed to authorize: 401 Unauthorized"),
        ] {
            let mut p = waiting(r, m);
            p.metadata.creation_timestamp = Some(Time(t(0)));
            let d = run(&job(Some(Phase::Pending)), Some(&p), 0, 0, t(5));
            assert_eq!(d.status.phase, Some(Phase::Failed), "{m}");
            assert_eq!(reason(&d), r);
            assert!(deletes(&d));
        }
    }

    /// A pod whose worker has ended beside another container in `others` (name, still
    /// running), with the pod phase Running.
    fn worker_done_beside(message: &str, code: i32, others: &[(&str, bool)]) -> Pod {
        use k8s_openapi::api::core::v1::ContainerStateRunning;
        let mut p = ended_pod("Running", None, code, "Completed", Some(message));
        if let Some(s) = p.status.as_mut() {
            for (name, running) in others {
                let state = if *running {
                    ContainerState {
                        running: Some(ContainerStateRunning::default()),
                        ..Default::default()
                    }
                } else {
                    ContainerState {
                        terminated: Some(ContainerStateTerminated::default()),
                        ..Default::default()
                    }
                };
                s.container_statuses
                    .get_or_insert_with(Vec::new)
                    .push(ContainerStatus {
                        name: (*name).into(),
                        state: Some(state),
                        ..Default::default()
                    });
            }
        }
        p
    }

    #[test]
    fn a_worker_done_beside_an_injected_sidecar_is_decided_and_its_pod_deleted() {
        let delete = Action::DeletePod {
            name: pod_name(JOB, 0),
            force: false,
        };
        // istio-proxy runs on: the pod stays Running, but the worker pushed the image.
        let ok = worker_done_beside(&success_message(), 0, &[("istio-proxy", true)]);
        let d = run(&job(Some(Phase::Running)), Some(&ok), 0, 0, t(50));
        assert_eq!(d.status.phase, Some(Phase::Succeeded));
        assert_eq!(d.status.image.as_deref(), Some("r/a:1.12"));
        assert_eq!(final_cb(&d), Some("succeeded"));
        assert_eq!(d.actions.iter().filter(|a| **a == delete).count(), 1);
        // A failure is the worker's too.
        let pushed = serde_json::to_string(&Outcome::failed(FailureReason::PushFailed, "denied"))
            .expect("json");
        let failed = worker_done_beside(&pushed, 1, &[("vault-agent", true)]);
        let d = run(&job(Some(Phase::Running)), Some(&failed), 0, 0, t(50));
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(reason(&d), "PushFailed");
        assert!(has(&d, |a| *a == delete));
        // Interrupted (a drain under way): re-created, the old pod deleted once.
        let interrupted = serde_json::to_string(&Outcome::failed(
            FailureReason::Interrupted,
            "the worker was asked to stop (SIGTERM)",
        ))
        .expect("json");
        let drained = worker_done_beside(&interrupted, 1, &[("istio-proxy", true)]);
        let d = run(&job(Some(Phase::Running)), Some(&drained), 0, 0, t(50));
        assert_eq!(d.status.pod_retries, 1);
        assert_eq!(d.actions.iter().filter(|a| **a == delete).count(), 1);
        // Being deleted already (by someone else, or by us before a conflict): still decided.
        let mut going = ok.clone();
        going.metadata.deletion_timestamp = Some(Time(t(49)));
        let d = run(&job(Some(Phase::Running)), Some(&going), 0, 0, t(50));
        assert_eq!(d.status.phase, Some(Phase::Succeeded));
        // Only native sidecars left (dind, an init container): the pod ends by itself.
        let mut native = worker_done_beside(&success_message(), 0, &[("istio-proxy", false)]);
        if let Some(s) = native.status.as_mut() {
            s.init_container_statuses = Some(vec![ContainerStatus {
                name: "dind".into(),
                state: Some(ContainerState {
                    running: Some(Default::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }]);
        }
        let d = run(&job(Some(Phase::Running)), Some(&native), 0, 0, t(50));
        assert_eq!(d.status.phase, Some(Phase::Succeeded));
        assert!(!deletes(&d));
    }

    #[test]
    fn a_succeeded_worker_wins_over_a_later_disruption_or_eviction() {
        let msg = success_message();
        let drained = with_condition(
            ended_pod("Succeeded", None, 0, "Completed", Some(&msg)),
            "DisruptionTarget",
            "EvictionByEvictionAPI",
            "Eviction API: evicting",
        );
        let evicted = ended_pod("Failed", Some("Evicted"), 0, "Completed", Some(&msg));
        let shutdown = ended_pod("Failed", Some("NodeShutdown"), 0, "Completed", Some(&msg));
        let mut deadline = ended_pod(
            "Failed",
            Some("DeadlineExceeded"),
            0,
            "Completed",
            Some(&msg),
        );
        if let Some(s) = deadline.status.as_mut() {
            s.message =
                Some("Pod was active on the node longer than the specified deadline".into());
        }
        for p in [drained, evicted, shutdown, deadline] {
            let d = run(&job(Some(Phase::Running)), Some(&p), 0, 0, t(9));
            assert_eq!(d.status.phase, Some(Phase::Succeeded), "{:?}", p.status);
            assert_eq!(d.status.pod_retries, 0);
            assert!(!creates(&d));
            assert_eq!(final_cb(&d), Some("succeeded"));
        }
    }

    #[test]
    fn an_unschedulable_pod_shows_why_then_fails_after_the_pending_limit() {
        let mut p = with_condition(
            pod("Pending"),
            "PodScheduled",
            "Unschedulable",
            "0/3 nodes are available: 3 Insufficient memory.",
        );
        p.metadata.creation_timestamp = Some(Time(t(0)));
        let d = run(&job(Some(Phase::Pending)), Some(&p), 0, 0, t(60));
        assert_eq!(d.status.phase, Some(Phase::Pending));
        let c = d.status.condition().cloned().expect("condition");
        assert_eq!(c.reason, "Unschedulable");
        assert!(c.message.contains("Insufficient memory"), "{}", c.message);
        let d = run(&job(Some(Phase::Pending)), Some(&p), 0, 0, t(600));
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(reason(&d), reasons::UNSCHEDULABLE);
        assert!(deletes(&d));
    }

    #[test]
    fn phase_unknown_does_not_move_a_running_build_back_to_pending() {
        let d = run(
            &job(Some(Phase::Running)),
            Some(&pod("Unknown")),
            0,
            0,
            t(5),
        );
        assert_eq!(d.status.phase, Some(Phase::Running));
    }

    #[test]
    fn a_deleted_job_is_stopped_reports_failed_then_drops_its_finalizer() {
        let mut j = job(Some(Phase::Running));
        j.metadata.deletion_timestamp = Some(Time(t(5)));
        let d = run(&j, Some(&pod("Running")), 0, 0, t(6));
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(reason(&d), reasons::DELETED);
        assert!(deletes(&d));
        assert_eq!(final_cb(&d), Some("failed"));
        assert!(
            !has(&d, |a| *a == Action::RemoveFinalizer),
            "not before the callback"
        );
        let mut sent = j.clone();
        sent.status = Some(d.status.clone());
        if let Some(s) = sent.status.as_mut() {
            s.callbacks.final_ = true;
        }
        let d = run(&sent, None, 0, 0, t(7));
        assert!(
            !has(&d, |a| *a == Action::RemoveFinalizer),
            "not before the end of its log"
        );
        assert!(has(&d, |a| matches!(a, Action::EndLog(_))));
        if let Some(s) = sent.status.as_mut() {
            s.log_ended = Some(true);
        }
        let d = run(&sent, None, 0, 0, t(7));
        assert!(has(&d, |a| *a == Action::RemoveFinalizer));
        assert!(!has(&d, |a| *a == Action::DeleteJob));
        assert!(final_cb(&d).is_none());
    }

    #[test]
    fn a_finished_job_lets_go_of_its_finalizer_once_its_callbacks_are_sent_not_at_its_ttl() {
        let mut done = job(Some(Phase::Succeeded));
        if let Some(s) = done.status.as_mut() {
            s.completion_time = Some(Time(t(0)));
        }
        // Its final callback still owed: held, whatever else happens.
        let d = run(&done, None, 0, 0, t(1));
        assert_eq!(final_cb(&d), Some("succeeded"));
        assert!(!has(&d, |a| *a == Action::RemoveFinalizer));
        // Sent: let go now (nobody deleting it), and it still waits for its TTL.
        if let Some(s) = done.status.as_mut() {
            s.callbacks.final_ = true;
        }
        let d = run(&done, None, 0, 0, t(1));
        assert!(has(&d, |a| *a == Action::RemoveFinalizer));
        assert!(has(&d, |a| *a == Action::Requeue(Duration::from_secs(3599))));
        assert!(!has(&d, |a| *a == Action::DeleteJob));
        assert!(d
            .actions
            .iter()
            .all(|a| !matches!(a, Action::SendCallback(_))));
        // Without it, it is never given it back, and the TTL still deletes it.
        done.metadata.finalizers = None;
        let d = run(&done, None, 0, 0, t(1));
        assert!(!has(&d, |a| matches!(
            a,
            Action::AddFinalizer | Action::RemoveFinalizer
        )));
        let d = run(&done, None, 0, 0, t(3600));
        assert!(has(&d, |a| *a == Action::DeleteJob));
        assert!(!has(&d, |a| *a == Action::AddFinalizer));
        // Past its TTL while still holding it (a job from before): both.
        done.metadata.finalizers = Some(vec![FINALIZER.into()]);
        let d = run(&done, None, 0, 0, t(3600));
        assert!(has(&d, |a| *a == Action::RemoveFinalizer));
        assert!(has(&d, |a| *a == Action::DeleteJob));
    }

    #[test]
    fn a_job_without_the_finalizer_gets_it_until_its_callbacks_are_sent() {
        let mut j = job(None);
        j.metadata.finalizers = None;
        let d = run(&j, None, 0, 0, t(1));
        assert!(has(&d, |a| *a == Action::AddFinalizer));
        let mut done = job(Some(Phase::Succeeded));
        done.metadata.finalizers = None;
        if let Some(s) = done.status.as_mut() {
            s.callbacks.final_ = true;
            s.completion_time = Some(Time(t(0)));
        }
        let d = run(&done, None, 0, 0, t(1));
        assert!(!has(&d, |a| *a == Action::AddFinalizer));
    }

    #[test]
    fn a_callback_in_flight_elsewhere_is_trusted_for_its_senders_budget() {
        use crate::operator::crd::CallbackInFlight;
        let mut sent = CallbacksSent::default();
        let takeover = Duration::from_secs(100);
        let idle = SenderHere::default();
        let running = SenderHere {
            running: true,
            ..idle
        };
        let seen = |secs| SenderHere {
            seen_for: Duration::from_secs(secs),
            ..idle
        };
        assert_eq!(
            callback_plan(&sent, "me", idle, takeover),
            CallbackPlan::Send
        );
        // The sender of the previous callback has recorded it and is about to let go.
        assert_eq!(
            callback_plan(&sent, "me", running, takeover),
            CallbackPlan::Wait(SENDER_FINISHING)
        );
        sent.in_flight = Some(CallbackInFlight {
            status: "pending".into(),
            by: "old".into(),
            since: Time(t(0)),
        });
        assert_eq!(
            callback_plan(&sent, "me", seen(40), takeover),
            CallbackPlan::Wait(Duration::from_secs(60))
        );
        assert_eq!(
            callback_plan(&sent, "me", seen(100), takeover),
            CallbackPlan::Send
        );
        sent.in_flight = Some(CallbackInFlight {
            status: "pending".into(),
            by: "me".into(),
            since: Time(t(0)),
        });
        assert_eq!(
            callback_plan(&sent, "me", running, takeover),
            CallbackPlan::InProgress
        );
        // The same identity after a restart does not know whether it sent: it waits too.
        assert_eq!(
            callback_plan(&sent, "me", seen(1), takeover),
            CallbackPlan::Wait(Duration::from_secs(99))
        );
    }

    #[test]
    fn the_takeover_wait_counts_from_this_process_first_seeing_the_record_not_its_since() {
        use crate::operator::crd::CallbackInFlight;
        let takeover = Duration::from_secs(100);
        // Recorded an hour ago by another replica's clock (or an hour ahead of ours): what
        // counts is that this process has only just seen it.
        for since in [t(-3600), t(3600)] {
            let sent = CallbacksSent {
                in_flight: Some(CallbackInFlight {
                    status: "pending".into(),
                    by: "old".into(),
                    since: Time(since),
                }),
                ..Default::default()
            };
            let here = SenderHere::default();
            assert_eq!(
                callback_plan(&sent, "me", here, takeover),
                CallbackPlan::Wait(takeover)
            );
        }
    }

    #[test]
    fn our_own_record_whose_sender_never_started_is_sent_at_once() {
        use crate::operator::crd::CallbackInFlight;
        let takeover = Duration::from_secs(100);
        let sent = CallbacksSent {
            in_flight: Some(CallbackInFlight {
                status: "pending".into(),
                by: "me".into(),
                since: Time(t(0)),
            }),
            ..Default::default()
        };
        let unstarted = SenderHere {
            unstarted: true,
            ..Default::default()
        };
        assert_eq!(
            callback_plan(&sent, "me", unstarted, takeover),
            CallbackPlan::Send
        );
        // Another's record is never ours to start, whatever this process believes.
        let mut theirs = sent.clone();
        if let Some(f) = theirs.in_flight.as_mut() {
            f.by = "other".into();
        }
        assert_eq!(
            callback_plan(&theirs, "me", unstarted, takeover),
            CallbackPlan::Wait(takeover)
        );
        // Its sender has started (and maybe delivered, then ended without recording): only
        // a takeover sends it again.
        assert_eq!(
            callback_plan(&sent, "me", SenderHere::default(), takeover),
            CallbackPlan::Wait(takeover)
        );
    }

    fn log_owed_by(d: &Decision) -> Option<LogOwed> {
        d.actions.iter().find_map(|a| match a {
            Action::EndLog(o) => Some(o.clone()),
            _ => None,
        })
    }

    fn log_end(d: &Decision) -> Option<LogEnd> {
        log_owed_by(d).and_then(|o| o.end)
    }

    fn outcome_message(reason: FailureReason, message: &str) -> String {
        serde_json::to_string(&Outcome::failed(reason, message)).expect("json")
    }

    #[test]
    fn the_controller_ends_the_log_of_a_build_no_worker_ended() {
        let exhausted = |phase| {
            let mut j = job(Some(phase));
            if let Some(s) = j.status.as_mut() {
                s.pod_retries = 2;
            }
            j
        };
        let cancelled = |phase| {
            let mut j = job(phase);
            j.spec.cancelled = true;
            j
        };
        let mut deleted = job(Some(Phase::Running));
        deleted.metadata.deletion_timestamp = Some(Time(t(5)));
        let mut pull = waiting("ErrImagePull", "r/w:1: not found");
        pull.metadata.creation_timestamp = Some(Time(t(0)));
        let interrupted = ended_pod(
            "Failed",
            None,
            1,
            "Error",
            Some(&outcome_message(
                FailureReason::Interrupted,
                "the worker pod was stopped",
            )),
        );
        let oom = ended_pod("Failed", None, 137, "OOMKilled", None);
        let no_outcome = ended_pod("Failed", None, 2, "Error", None);
        let cases: Vec<(&str, BuildJob, Option<Pod>, Timestamp, &str)> = vec![
            (
                "stopped while queued",
                cancelled(Some(Phase::Queued)),
                None,
                t(1),
                reasons::CANCELLED,
            ),
            (
                "stopped before it was queued",
                cancelled(None),
                None,
                t(1),
                reasons::CANCELLED,
            ),
            // Its worker is sent SIGTERM and leaves the end to the controller.
            (
                "stopped while running",
                cancelled(Some(Phase::Running)),
                Some(pod("Running")),
                t(1),
                reasons::CANCELLED,
            ),
            (
                "deleted while running",
                deleted,
                Some(pod("Running")),
                t(6),
                reasons::DELETED,
            ),
            (
                "an image that cannot be pulled",
                job(Some(Phase::Pending)),
                Some(pull),
                t(5),
                "ErrImagePull",
            ),
            (
                "OOM-killed",
                job(Some(Phase::Running)),
                Some(oom),
                t(9),
                reasons::OOM_KILLED,
            ),
            (
                "no outcome",
                job(Some(Phase::Running)),
                Some(no_outcome),
                t(9),
                reasons::WORKER_FAILED,
            ),
            (
                "lost, retries spent",
                exhausted(Phase::Running),
                None,
                t(9),
                reasons::POD_LOST,
            ),
            (
                "interrupted, retries spent",
                exhausted(Phase::Running),
                Some(interrupted),
                t(9),
                reasons::POD_DISRUPTED,
            ),
            (
                "past the timeout, never started",
                job(Some(Phase::Pending)),
                Some(pod("Pending")),
                t(1200 + 120),
                reasons::TIMEOUT,
            ),
        ];
        for (what, j, p, now, want) in cases {
            let d = run(&j, p.as_ref(), 0, 0, now);
            assert_eq!(d.status.phase, Some(Phase::Failed), "{what}");
            assert_eq!(d.status.log_ended, Some(false), "{what}");
            let end = log_end(&d).unwrap_or_else(|| panic!("{what}: {:?}", d.actions));
            assert_eq!(end.reason, want, "{what}");
            let message = d.status.condition().map(|c| c.message.clone());
            assert_eq!(Some(end.message.clone()), message, "{what}");
            assert_eq!(
                end.failed_line(),
                format!("Build failed ({want}): {}", end.message),
                "{what}"
            );
        }
        let queued = run(&cancelled(Some(Phase::Queued)), None, 0, 0, t(1));
        assert_eq!(
            log_end(&queued).map(|e| e.failed_line()).as_deref(),
            Some("Build failed (Cancelled): stopped by request before it started")
        );
    }

    #[test]
    fn a_build_its_worker_ended_or_that_goes_on_owes_no_log_end() {
        let failed = ended_pod(
            "Failed",
            None,
            1,
            "Error",
            Some(&outcome_message(
                FailureReason::BuildFailed,
                "step 2 failed",
            )),
        );
        let timed_out = ended_pod(
            "Failed",
            None,
            1,
            "Error",
            Some(&outcome_message(FailureReason::Timeout, "too long")),
        );
        let mut deadline = timed_out.clone();
        if let Some(s) = deadline.status.as_mut() {
            s.reason = Some("DeadlineExceeded".into());
        }
        let ok = ended_pod("Succeeded", None, 0, "Completed", Some(&success_message()));
        for (what, p, phase) in [
            ("the build failed", failed, Phase::Failed),
            ("its own timeout", timed_out, Phase::Failed),
            (
                "its own timeout at the pod's deadline",
                deadline,
                Phase::Failed,
            ),
            ("a success", ok, Phase::Succeeded),
        ] {
            let d = run(&job(Some(Phase::Running)), Some(&p), 0, 0, t(9));
            assert_eq!(d.status.phase, Some(phase), "{what}");
            assert_eq!(d.status.log_ended, Some(true), "{what}");
            assert!(log_end(&d).is_none(), "{what}");
        }
        // Interrupted with retries left: a new pod runs the build, and its worker ends the log.
        let interrupted = ended_pod(
            "Failed",
            None,
            1,
            "Error",
            Some(&outcome_message(FailureReason::Interrupted, "stopped")),
        );
        let d = run(&job(Some(Phase::Running)), Some(&interrupted), 0, 0, t(9));
        assert!(creates(&d));
        assert_eq!(d.status.log_ended, None);
        assert!(log_end(&d).is_none());
        // Running, queued: nothing has ended.
        let d = run(
            &job(Some(Phase::Running)),
            Some(&pod("Running")),
            0,
            0,
            t(9),
        );
        assert_eq!((d.status.log_ended, log_end(&d)), (None, None));
    }

    #[test]
    fn a_log_its_worker_could_not_store_is_copied_from_its_pod_before_the_pod_goes() {
        let unstored = |outcome: Outcome| {
            serde_json::to_string(&crate::build::Termination {
                outcome,
                timings: None,
                log_stored: Some(false),
            })
            .expect("json")
        };
        let ok = Outcome::Succeeded {
            image: "r/a:1.12".into(),
            digest: None,
        };
        let delete = Action::DeletePod {
            name: pod_name(JOB, 0),
            force: false,
        };
        // A success and a failure the worker ended itself: a copy owed, no end.
        let failed = Outcome::failed(FailureReason::BuildFailed, "step 2 failed");
        for (what, outcome, code, phase) in [
            ("a success", ok.clone(), 0, Phase::Succeeded),
            ("a failure", failed, 1, Phase::Failed),
        ] {
            let p = ended_pod("Failed", None, code, "Error", Some(&unstored(outcome)));
            let d = run(&job(Some(Phase::Running)), Some(&p), 0, 0, t(9));
            assert_eq!(d.status.phase, Some(phase), "{what}");
            assert_eq!(
                (d.status.log_ended, d.status.log_copied),
                (Some(true), Some(false)),
                "{what}"
            );
            let owed = LogOwed {
                copy_pod_log: true,
                end: None,
            };
            assert_eq!(log_owed_by(&d), Some(owed), "{what}");
            assert!(!has(&d, |a| *a == Action::RemoveFinalizer), "{what}");
        }
        // Interrupted and out of retries: the copy, then the end the worker left out.
        let cut = Outcome::failed(FailureReason::Interrupted, "stopped");
        let p = ended_pod("Failed", None, 1, "Error", Some(&unstored(cut)));
        let mut spent = job(Some(Phase::Running));
        if let Some(st) = spent.status.as_mut() {
            st.pod_retries = 2;
        }
        let d = run(&spent, Some(&p), 0, 0, t(9));
        let owed = log_owed_by(&d).expect("owed");
        assert!(owed.copy_pod_log && owed.end.is_some(), "{owed:?}");
        // Beside a sidecar that keeps the pod running: the pod is left for the copier (its
        // log goes with it), which deletes it after the copy.
        let held = worker_done_beside(&unstored(ok), 0, &[("istio-proxy", true)]);
        let d = run(&job(Some(Phase::Running)), Some(&held), 0, 0, t(50));
        assert_eq!(d.status.phase, Some(Phase::Succeeded));
        assert!(!has(&d, |a| *a == delete), "{:?}", d.actions);
        assert!(log_owed_by(&d).is_some_and(|o| o.copy_pod_log));
        // Recorded (a finished build's reconcile reads no pod): the BuildJob goes its way.
        let mut after = job(Some(Phase::Running));
        after.status = Some(d.status.clone());
        if let Some(st) = after.status.as_mut() {
            st.log_copied = Some(true);
            st.callbacks.pending = true;
            st.callbacks.final_ = true;
        }
        let d = run(&after, None, 0, 0, t(52));
        assert_eq!(log_owed_by(&d), None);
        assert!(has(&d, |a| *a == Action::RemoveFinalizer));
        // A worker that stored its log (or an older one that never says): nothing copied.
        let d = run(
            &job(Some(Phase::Running)),
            Some(&ended_pod(
                "Succeeded",
                None,
                0,
                "Completed",
                Some(&success_message()),
            )),
            0,
            0,
            t(9),
        );
        assert_eq!(d.status.log_copied, None);
        assert_eq!(log_owed_by(&d), None);
    }

    #[test]
    fn an_owed_log_end_is_owed_until_recorded_and_holds_the_finalizer_meanwhile() {
        let mut owed = job(Some(Phase::Queued));
        owed.spec.cancelled = true;
        let first = run(&owed, None, 0, 0, t(1));
        // After a restart (or a leader change) the status alone says it is owed: every
        // callback sent, past the TTL, and still the end is written and the BuildJob kept.
        let mut done = owed.clone();
        done.status = Some(first.status.clone());
        if let Some(s) = done.status.as_mut() {
            s.callbacks.final_ = true;
        }
        let d = run(&done, None, 0, 0, t(7200));
        assert_eq!(log_end(&d), log_end(&first));
        assert!(!has(&d, |a| matches!(
            a,
            Action::RemoveFinalizer | Action::DeleteJob
        )));
        // Recorded: never again, and the BuildJob goes its way.
        if let Some(s) = done.status.as_mut() {
            s.log_ended = Some(true);
        }
        let d = run(&done, None, 0, 0, t(7200));
        assert!(log_end(&d).is_none());
        assert!(has(&d, |a| *a == Action::RemoveFinalizer));
        assert!(has(&d, |a| *a == Action::DeleteJob));
        // A BuildJob that failed before the field existed is not given a second end.
        if let Some(s) = done.status.as_mut() {
            s.log_ended = None;
        }
        let d = run(&done, None, 0, 0, t(7200));
        assert!(log_end(&d).is_none());
    }
}
