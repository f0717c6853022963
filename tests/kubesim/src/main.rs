//! `kubesim`: a simulated cluster for trying buildshuttle's Kubernetes mode by hand.
//! Prints where the kubeconfig is, then serves until killed.

use clap::Parser;

#[derive(Parser)]
#[command(about = "A simulated Kubernetes API server and kubelet (see README: Simulated cluster)")]
struct Args {
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 6443)]
    port: u16,
    /// Where to write the kubeconfig.
    #[arg(long, default_value = "./kubeconfig")]
    kubeconfig: std::path::PathBuf,
    /// Delay every watch event by a random 50–500 ms.
    #[arg(long)]
    watch_delay: bool,
    /// `docker` runs pods on the local dockerd; `instant` completes them at once.
    #[arg(long, default_value = "docker")]
    kubelet: String,
    /// Serve plain HTTP instead of HTTPS.
    #[arg(long)]
    plain_http: bool,
    /// Namespaces to create at start (besides default).
    #[arg(long)]
    namespace: Vec<String>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let kubelet = match args.kubelet.as_str() {
        "docker" => kubesim::KubeletMode::Docker,
        "instant" => kubesim::KubeletMode::Instant,
        other => {
            eprintln!("--kubelet must be docker or instant, not {other}");
            std::process::exit(2);
        }
    };
    let mut namespaces = vec!["default".to_string()];
    namespaces.extend(args.namespace);
    let kubeconfig = std::path::absolute(&args.kubeconfig).unwrap_or(args.kubeconfig);
    let cfg = kubesim::SimConfig {
        port: args.port,
        tls: !args.plain_http,
        kubelet,
        kubeconfig: Some(kubeconfig.clone()),
        namespaces,
        ..Default::default()
    };
    let sim = match kubesim::Sim::start(cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kubesim: {e}");
            std::process::exit(1);
        }
    };
    sim.set_watch_delay(args.watch_delay);
    println!("kubesim listening on {}", sim.addr());
    println!("export KUBECONFIG={}", kubeconfig.display());
    let _ = tokio::signal::ctrl_c().await;
}
