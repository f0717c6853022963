//! BuildKit's progress (the `moby.buildkit.trace` messages of a BuildKit build) as build-log
//! lines, in the form `docker build --progress=plain` prints: `#N name`, `#N 0.123 output`,
//! `#N DONE 0.4s`, `#N CACHED`, `#N ERROR: …`. Transfer counters are shown once, when done,
//! so a large context does not flood the log. Memory is bounded by the number of steps plus
//! one partial output line (at most [`MAX_PARTIAL`] bytes) per running step.

use bollard::moby::buildkit::v1::{StatusResponse, Vertex, VertexLog, VertexStatus};
use std::collections::HashMap;

/// A step's output is cut into a line at this many bytes even without a newline.
const MAX_PARTIAL: usize = 16 * 1024;

#[derive(Default)]
pub struct Progress {
    steps: HashMap<String, Step>,
}

#[derive(Default)]
struct Step {
    /// `#N`, in the order the steps were first seen.
    number: usize,
    started: Option<(i64, i32)>,
    announced: bool,
    ended: bool,
    partial: Vec<u8>,
}

impl Progress {
    /// The log lines one trace message adds, in order.
    pub fn lines(&mut self, status: StatusResponse) -> Vec<String> {
        let mut out = Vec::new();
        // Announcements first and endings last, so a step's output sits between them.
        for v in &status.vertexes {
            self.announce(v, &mut out);
        }
        for s in status.statuses {
            self.status(s, &mut out);
        }
        for l in status.logs {
            self.output(l, &mut out);
        }
        for w in status.warnings {
            let n = self.step(&w.vertex).number;
            out.push(format!("#{n} WARN: {}", String::from_utf8_lossy(&w.short)));
        }
        for v in &status.vertexes {
            self.finish(v, &mut out);
        }
        out
    }

    fn step(&mut self, digest: &str) -> &mut Step {
        let next = self.steps.len() + 1;
        self.steps
            .entry(digest.to_string())
            .or_insert_with(|| Step {
                number: next,
                ..Default::default()
            })
    }

    fn announce(&mut self, v: &Vertex, out: &mut Vec<String>) {
        let step = self.step(&v.digest);
        if let Some(t) = &v.started {
            step.started = Some((t.seconds, t.nanos));
        }
        if !step.announced && (v.started.is_some() || v.cached || v.completed.is_some()) {
            step.announced = true;
            out.push(format!("#{} {}", step.number, v.name));
        }
    }

    fn finish(&mut self, v: &Vertex, out: &mut Vec<String>) {
        let Some(done) = v.completed.as_ref() else {
            return;
        };
        let step = self.step(&v.digest);
        let n = step.number;
        if step.ended {
            return;
        }
        step.ended = true;
        if !step.partial.is_empty() {
            let rest = std::mem::take(&mut step.partial);
            out.push(format!("#{n} {}", String::from_utf8_lossy(&rest)));
        }
        if !v.error.is_empty() {
            out.push(format!("#{n} ERROR: {}", v.error));
        } else if v.cached {
            out.push(format!("#{n} CACHED"));
        } else {
            let secs = step
                .started
                .map(|s| seconds_between(s, (done.seconds, done.nanos)))
                .unwrap_or(0.0);
            out.push(format!("#{n} DONE {secs:.1}s"));
        }
    }

    fn status(&mut self, s: VertexStatus, out: &mut Vec<String>) {
        if s.completed.is_none() {
            return;
        }
        let n = self.step(&s.vertex).number;
        let what = if s.name.is_empty() { &s.id } else { &s.name };
        let amount = match (s.current, s.total) {
            (c, t) if t > 0 => format!(" {} / {}", bytes(c), bytes(t)),
            (c, _) if c > 0 => format!(" {}", bytes(c)),
            _ => String::new(),
        };
        out.push(format!("#{n} {what}{amount} done"));
    }

    fn output(&mut self, l: VertexLog, out: &mut Vec<String>) {
        let step = self.step(&l.vertex);
        let n = step.number;
        let at = match (&l.timestamp, step.started) {
            (Some(t), Some(s)) => format!("{:.3} ", seconds_between(s, (t.seconds, t.nanos))),
            _ => String::new(),
        };
        step.partial.extend_from_slice(&l.msg);
        while let Some(i) = step.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = step.partial.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..i]);
            out.push(format!("#{n} {at}{}", text.trim_end_matches('\r')));
        }
        if step.partial.len() >= MAX_PARTIAL {
            let line = std::mem::take(&mut step.partial);
            out.push(format!("#{n} {at}{}", String::from_utf8_lossy(&line)));
        }
    }
}

fn seconds_between(from: (i64, i32), to: (i64, i32)) -> f64 {
    let secs = (to.0 - from.0) as f64 + f64::from(to.1 - from.1) / 1e9;
    secs.max(0.0)
}

/// `1234567` → `1.23MB`, as BuildKit prints sizes.
fn bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    match n {
        n if n >= 1e9 => format!("{:.2}GB", n / 1e9),
        n if n >= 1e6 => format!("{:.2}MB", n / 1e6),
        n if n >= 1e3 => format!("{:.2}kB", n / 1e3),
        n => format!("{n}B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vertex(digest: &str, name: &str, started: Option<i64>, completed: Option<i64>) -> Vertex {
        let at = |s: i64| {
            let mut t = Vertex::default().started.unwrap_or_default();
            t.seconds = s;
            t
        };
        Vertex {
            digest: digest.into(),
            name: name.into(),
            started: started.map(at),
            completed: completed.map(at),
            ..Default::default()
        }
    }

    fn output(digest: &str, msg: &str) -> VertexLog {
        VertexLog {
            vertex: digest.into(),
            msg: msg.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn steps_are_numbered_announced_once_and_their_output_cut_into_lines() {
        let mut p = Progress::default();
        let first = p.lines(StatusResponse {
            vertexes: vec![
                vertex("a", "[1/2] FROM base", Some(10), None),
                vertex("b", "[2/2] RUN echo hi", None, None),
            ],
            ..Default::default()
        });
        assert_eq!(first, vec!["#1 [1/2] FROM base"]);
        let second = p.lines(StatusResponse {
            vertexes: vec![
                vertex("a", "[1/2] FROM base", Some(10), Some(12)),
                vertex("b", "[2/2] RUN echo hi", Some(12), None),
            ],
            logs: vec![output("b", "hi\r\npart"), output("b", "ial\n")],
            ..Default::default()
        });
        assert_eq!(
            second,
            vec![
                "#2 [2/2] RUN echo hi",
                "#2 hi",
                "#2 partial",
                "#1 DONE 2.0s"
            ]
        );
        let failed = p.lines(StatusResponse {
            vertexes: vec![Vertex {
                error: "exit code: 1".into(),
                ..vertex("b", "[2/2] RUN echo hi", Some(12), Some(13))
            }],
            logs: vec![output("b", "no newline")],
            ..Default::default()
        });
        assert_eq!(failed, vec!["#2 no newline", "#2 ERROR: exit code: 1"]);
    }

    #[test]
    fn a_cached_step_and_a_finished_transfer_are_one_line_each() {
        let mut p = Progress::default();
        let lines = p.lines(StatusResponse {
            vertexes: vec![Vertex {
                cached: true,
                ..vertex("c", "[2/3] COPY . /app", Some(1), Some(1))
            }],
            statuses: vec![
                VertexStatus {
                    vertex: "c".into(),
                    id: "transferring context".into(),
                    current: 1500,
                    ..Default::default()
                },
                VertexStatus {
                    vertex: "c".into(),
                    id: "transferring context".into(),
                    current: 2_500_000,
                    completed: vertex("", "", Some(2), None).started,
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        assert_eq!(
            lines,
            vec![
                "#1 [2/3] COPY . /app",
                "#1 transferring context 2.50MB done",
                "#1 CACHED"
            ]
        );
    }

    #[test]
    fn output_without_newlines_is_cut_at_a_bounded_length() {
        let mut p = Progress::default();
        let long = "x".repeat(MAX_PARTIAL + 10);
        let lines = p.lines(StatusResponse {
            logs: vec![output("a", &long)],
            ..Default::default()
        });
        assert_eq!(lines.len(), 1);
        assert!(p.steps["a"].partial.is_empty());
    }
}
