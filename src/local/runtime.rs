//! The runtime that runs local builds, apart from the one serving the API. Its threads run
//! at a lower CPU priority, so accepting a build (a parse and one group-committed write)
//! never waits behind the work of running ones: under a burst of `POST /` the builds
//! already accepted get the CPU the API leaves. Builds mostly wait on dockerd, the
//! registry and the network, which priority does not slow.

use std::io;
use tokio::runtime::{Handle, Runtime};

/// Nice value of the build threads: when the API and builds both want a core, the API gets
/// about 90 % of it (CFS weights 1024 vs 110); an idle API leaves builds all of it.
const BUILD_NICE: i32 = 10;

/// Owns the build threads; dropping it stops them without waiting (queued builds stay in
/// the journal for the next start).
pub(crate) struct BuildRuntime {
    rt: Option<Runtime>,
    handle: Handle,
}

impl BuildRuntime {
    pub(crate) fn start() -> io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("build")
            .on_thread_start(lower_priority)
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        Ok(Self {
            rt: Some(rt),
            handle,
        })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for BuildRuntime {
    fn drop(&mut self) {
        // Dropped from inside the API's runtime: a blocking shutdown would panic there.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Lowers the calling thread's priority (on Linux `setpriority` with `who = 0` is per
/// thread; threads it starts inherit it). Failing leaves the default priority: only
/// latency under load changes.
pub(crate) fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority has no memory-safety preconditions; it only reads its arguments.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, BUILD_NICE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_threads_run_at_a_lower_priority_than_the_caller() {
        let caller = current_nice();
        let rt = BuildRuntime::start().expect("runtime");
        let on_build_thread = rt
            .handle()
            .block_on(async { tokio::spawn(async { current_nice() }).await })
            .expect("task");
        assert_eq!(on_build_thread, caller + BUILD_NICE);
        // And its blocking pool (archive extraction, file writes) too.
        let blocking = rt
            .handle()
            .block_on(async { tokio::task::spawn_blocking(current_nice).await })
            .expect("task");
        assert_eq!(blocking, caller + BUILD_NICE);
    }

    fn current_nice() -> i32 {
        // SAFETY: as above; getpriority only reads its arguments.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }
}
