//! Open-loop HTTP load for `benches/post_rate.sh`: requests leave on a fixed schedule (`RATE`
//! a second, spread over `CONNECTIONS` keep-alive connections) whatever the answers do, so a
//! route's latency is compared with another's at the same offered load. wrk's closed loop
//! cannot do that: each of its connections waits for its answer, so a route that costs more
//! CPU is also offered fewer requests and its latency follows its cost (Little's law).
//!
//! Latency counts from each request's scheduled time, not from when it was written, so a
//! request held back by a slow earlier answer on its connection counts that wait too
//! (coordinated omission). `late_p99_ms` says how late this generator's own threads woke.
//!
//!   cargo run --release -p open-loop -- ADDR ROUTE RATE SECONDS CONNECTIONS [SOURCES]
//!   ROUTE: `octhc` (GET /octhc) or `post` (POST /, every request a new build of SOURCES)
//!
//! Prints one line in the format of `benches/get_rate.lua`'s:
//! `RESULT rps=… p50_ms=… p90_ms=… p99_ms=… p999_ms=… max_ms=… requests=… non2xx=… errors=… late_p99_ms=…`

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

struct Run {
    addr: String,
    post: bool,
    rate: f64,
    seconds: f64,
    connections: usize,
    sources: String,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    late_us: Vec<u64>,
    non2xx: u64,
    errors: u64,
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.len() < 5 {
        eprintln!("usage: open_loop ADDR octhc|post RATE SECONDS CONNECTIONS [SOURCES]");
        std::process::exit(2);
    }
    let number = |i: usize| -> f64 {
        args[i].parse().unwrap_or_else(|_| {
            eprintln!("not a number: {}", args[i]);
            std::process::exit(2)
        })
    };
    let run = std::sync::Arc::new(Run {
        addr: args[0].clone(),
        post: args[1] == "post",
        rate: number(2),
        seconds: number(3),
        connections: number(4) as usize,
        sources: args
            .get(5)
            .cloned()
            .unwrap_or_else(|| "http://127.0.0.1:9/gone.tgz".into()),
    });
    // Every connection open before the clock starts, so no request waits for a handshake.
    let streams: Vec<TcpStream> = (0..run.connections)
        .map(|_| {
            let s = TcpStream::connect(&run.addr).unwrap_or_else(|e| {
                eprintln!("cannot connect to {}: {e}", run.addr);
                std::process::exit(1)
            });
            let _ = s.set_nodelay(true);
            s
        })
        .collect();
    let start = Instant::now() + Duration::from_millis(50);
    let threads: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(k, s)| {
            let run = run.clone();
            std::thread::spawn(move || connection(&run, k, s, start))
        })
        .collect();
    let mut all = Tally::default();
    for t in threads {
        if let Ok(t) = t.join() {
            all.latencies_us.extend(t.latencies_us);
            all.late_us.extend(t.late_us);
            all.non2xx += t.non2xx;
            all.errors += t.errors;
        }
    }
    // Answered per second over the time it took (more than SECONDS when the server fell behind).
    let took = start.elapsed().as_secs_f64().max(run.seconds);
    all.latencies_us.sort_unstable();
    all.late_us.sort_unstable();
    let pct = |v: &[u64], p: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[i.clamp(1, v.len()) - 1] as f64 / 1000.0
    };
    let l = &all.latencies_us;
    println!(
        "RESULT rps={:.0} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} p999_ms={:.2} max_ms={:.2} requests={} non2xx={} errors={} late_p99_ms={:.2}",
        l.len() as f64 / took,
        pct(l, 50.0),
        pct(l, 90.0),
        pct(l, 99.0),
        pct(l, 99.9),
        pct(l, 100.0),
        l.len(),
        all.non2xx,
        all.errors,
        pct(&all.late_us, 99.0),
    );
}

/// Connection `k` sends requests k, k + C, k + 2C, … of the schedule (request i is due at
/// `start + i / RATE`), each after the previous answer on it.
fn connection(run: &Run, k: usize, mut stream: TcpStream, start: Instant) -> Tally {
    let mut tally = Tally::default();
    let total = (run.rate * run.seconds) as usize;
    let app_uuid = format!("0b1c2d3e-aaaa-bbbb-cccc-{k:012}");
    let mut buf = vec![0u8; 16 * 1024];
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut i = k;
    while i < total {
        let due = start + Duration::from_secs_f64(i as f64 / run.rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        tally
            .late_us
            .push(Instant::now().saturating_duration_since(due).as_micros() as u64);
        let request = if run.post {
            let body = format!(
                r#"{{"app":"bench","space":"default","app_uuid":"{app_uuid}","build_uuid":"{}","build_number":{},"sources":"{}","gm_registry_host":"127.0.0.1:5000","gm_registry_repo":"bench"}}"#,
                build_uuid(seed, i),
                i + 1,
                run.sources
            );
            format!(
                "POST / HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                run.addr,
                body.len()
            )
        } else {
            format!("GET /octhc HTTP/1.1\r\nHost: {}\r\n\r\n", run.addr)
        };
        match exchange(&mut stream, request.as_bytes(), &mut buf) {
            Ok(status) => {
                tally.latencies_us.push(due.elapsed().as_micros() as u64);
                if !(200..300).contains(&status) {
                    tally.non2xx += 1;
                }
            }
            Err(_) => {
                tally.errors += 1;
                match TcpStream::connect(&run.addr) {
                    Ok(s) => stream = s,
                    Err(_) => break,
                }
            }
        }
        i += run.connections;
    }
    tally
}

/// Writes one request and reads its whole answer (headers, then Content-Length bytes).
fn exchange(stream: &mut TcpStream, request: &[u8], buf: &mut [u8]) -> std::io::Result<u16> {
    stream.write_all(request)?;
    let mut have = 0;
    let head_end = loop {
        let n = stream.read(&mut buf[have..])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
        if let Some(p) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if have == buf.len() {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = have - head_end;
    while body < length {
        let n = stream.read(buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        body += n;
    }
    Ok(status)
}

/// A version-4-shaped UUID, unique per run (`seed`) and request (`i`): the service refuses a
/// `build_uuid` it has seen as that build again (no work), and a random one needs a dependency.
fn build_uuid(seed: u64, i: usize) -> String {
    let i = i as u64;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (seed >> 32) as u32,
        (seed >> 16) as u16,
        seed & 0xfff,
        (i >> 48) & 0xfff,
        i & 0xffff_ffff_ffff
    )
}
