//! The real `buildshuttle` binary as a child process.

use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_buildshuttle");

pub struct Proc {
    pub child: Child,
    pub port: u16,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn spawn(data: &std::path::Path, port: u16, extra: &[(&str, &str)]) -> Proc {
    spawn_with_output(data, port, extra, Stdio::null(), Stdio::null())
}

/// Like `spawn`, with the child's stdout and stderr sent where the test wants them.
pub fn spawn_with_output(
    data: &std::path::Path,
    port: u16,
    extra: &[(&str, &str)],
    stdout: Stdio,
    stderr: Stdio,
) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.stdout(stdout).stderr(stderr);
    launch(cmd, data, port, extra)
}

/// Like `spawn`, with the open-file limit (soft and hard) at `nofile`, as a tight
/// `ulimit -n` or container runtime sets it.
pub fn spawn_with_nofile(
    data: &std::path::Path,
    port: u16,
    extra: &[(&str, &str)],
    nofile: u32,
) -> Proc {
    // prlimit execs the service: the child is the service itself.
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile={nofile}:{nofile}"))
        .arg(BIN)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    launch(cmd, data, port, extra)
}

/// Runs `cmd serve` with the test's settings and waits for its port.
fn launch(mut cmd: Command, data: &std::path::Path, port: u16, extra: &[(&str, &str)]) -> Proc {
    let child = cmd
        .arg("serve")
        .env("PORT", port.to_string())
        .env("LISTEN_ADDRESS", "127.0.0.1")
        .env("DATA_DIR", data)
        .env("CALLBACK_RETRY_SECONDS", "20")
        .envs(extra.iter().copied())
        .spawn()
        .expect("spawn serve");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "serve did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Proc { child, port }
}

impl Proc {
    pub fn url(&self, p: &str) -> String {
        format!("http://127.0.0.1:{}{p}", self.port)
    }
    pub async fn post(&self, b: &Value) {
        let r = reqwest::Client::new()
            .post(self.url("/"))
            .json(b)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    pub async fn log(&self, b: &Value) -> String {
        let p = super::logs_path(b);
        match reqwest::get(self.url(&p)).await {
            Ok(r) if r.status() == 200 => r.text().await.unwrap_or_default(),
            _ => String::new(),
        }
    }
    pub async fn wait_log(&self, b: &Value, needle: &str) {
        let start = Instant::now();
        while !self.log(b).await.contains(needle) {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "log never had {needle}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    /// Waits for the process to exit, failing with `what` after `within`.
    pub async fn wait_exit(&mut self, within: Duration, what: &str) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait for serve") {
                return s;
            }
            assert!(start.elapsed() < within, "{what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
