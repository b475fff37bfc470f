//! The `agora` binary: `node` runs one node, `cluster` launches a local cluster, `bench` loads one.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use agora::config::ClusterConfig;
use agora::node::{self, NodeOptions, PeerAuth};

/// glibc's malloc took a quarter of a loaded node's CPU (arena locking, consolidation
/// of the many short-lived buffers a request makes); mimalloc's thread-local pages do not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "agora", version, about = "Multi-datacentre active-active backend for online shops")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node of the cluster.
    Node(NodeArgs),
    /// Load a running cluster's HTTP API and report throughput and latency.
    Bench(agora::bench::BenchArgs),
    /// Ask one node for every order id a bench run recorded (`bench --record-ids`), from
    /// its own state; fails if any is not served.
    VerifyOrders(agora::verify_orders::VerifyArgs),
    /// Draw a soak run's per-interval rows (`scripts/bench-soak`) as an SVG.
    SoakPlot(agora::soak_plot::PlotArgs),
    /// Where a stopped node's data dir's bytes go: files, sled trees, record kinds (JSON).
    StorageUsage {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Launch and drive a whole local cluster (processes, network namespaces or docker).
    Cluster(agora::launcher::ClusterArgs),
    /// Fault scenarios against a live cluster, with a checker of the recorded history.
    Chaos(agora::chaos::run::ChaosArgs),
    /// Create the cluster's CA, node and admin certificates and the admin token.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Check a cluster file and print its nodes.
    Config {
        /// Cluster file (default: the embedded 3 DC × 3 node topology).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a CA (if the directory has none), a certificate for every node of the
    /// cluster file and for `admin`, and an admin token. Existing files are kept.
    Create {
        /// Cluster file (default: the embedded 3 DC × 3 node topology).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where to write them.
        #[arg(long, default_value = ".agora/certs")]
        out: PathBuf,
        /// Issue node and admin certificates anew from the existing CA (rotation).
        #[arg(long)]
        reissue: bool,
        /// Days the node and admin certificates stay valid.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(i64).range(1..=3650))]
        days: i64,
    },
}

#[derive(clap::Args)]
struct NodeArgs {
    /// Node name from the cluster file, e.g. dc1-n1.
    #[arg(long)]
    node: String,
    /// Cluster file (default: the embedded 3 DC × 3 node topology).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (default: .agora/data/NODE).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Enable admin endpoints that inject faults and crash actors (tests only).
    #[arg(long)]
    enable_test_hooks: bool,
    /// Directory with ca.pem, NODE.pem, NODE.key and admin.token (default: .agora/certs,
    /// where `agora cluster up` and `agora certs create` put them).
    #[arg(long)]
    certs: Option<PathBuf>,
    /// INSECURE: accept peer traffic without certificates. Anyone who can reach the peer
    /// port can then act as any node of any DC. For debugging only.
    #[arg(long, conflicts_with = "certs")]
    insecure_plaintext_peers: bool,
    /// File holding the admin API's bearer token (default: admin.token in the certs
    /// directory). Without a token the admin API refuses every call.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,openraft=warn,sled=warn,hickory_server=warn".into());
    // Colours for a terminal only: a node's log is mostly read from a file, with grep.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Raises the soft open-file limit to the hard one: every HTTP and peer connection is a
/// file descriptor, and the connection caps in `[limits]` are meant to be what stops a
/// flood, not a distribution's default of 1024 (at which `accept` would start failing).
fn raise_nofile_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return tracing::warn!(soft = before, hard = lim.rlim_max, error = %std::io::Error::last_os_error(), "cannot raise the open-file limit");
        }
    }
    tracing::info!(before, now = lim.rlim_cur, "open-file limit");
}

async fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    init_logging(args.log_json);
    raise_nofile_limit();
    let config = ClusterConfig::load(args.config.as_deref())?;
    let data_dir = args.data_dir.unwrap_or_else(|| PathBuf::from(".agora/data").join(&args.node));
    let certs = args.certs.unwrap_or_else(|| PathBuf::from(".agora/certs"));
    if !args.insecure_plaintext_peers && !certs.is_dir() {
        anyhow::bail!(
            "no certificates in {}: create them with `agora certs create --out {}` (with the same --config), or start the cluster with `agora cluster up`, which does",
            certs.display(),
            certs.display()
        );
    }
    let token_file = args.admin_token_file.or_else(|| (!args.insecure_plaintext_peers).then(|| agora::certs::token_path(&certs)));
    let admin_token = token_file.map(|f| agora::certs::read_token(&f)).transpose()?;
    let peer_auth = if args.insecure_plaintext_peers { PeerAuth::InsecurePlaintext } else { PeerAuth::Certs(certs) };
    let opts = NodeOptions { name: args.node, data_dir, test_hooks: args.enable_test_hooks, peer_auth, admin_token };
    let stop = agora::signals::Stop::listen()?;
    let running = node::start(config, opts).await?;
    stop.requested().await;
    running.shutdown().await;
    Ok(())
}

fn show_config(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = ClusterConfig::load(path.as_deref())?;
    println!("cluster {} (zone {}): {} DCs, {} nodes", config.cluster.name, config.cluster.zone, config.dcs.len(), config.nodes().len());
    for n in config.nodes() {
        println!("  {:<10} {:<5} id {:<5} http {}  peer {}  dns {}", n.name, n.dc, n.id, n.authority(n.http), n.authority(n.peer), n.authority(n.dns));
    }
    Ok(())
}

fn certs(cmd: CertsCmd) -> anyhow::Result<()> {
    let CertsCmd::Create { config, out, reissue, days } = cmd;
    let config = ClusterConfig::load(config.as_deref())?;
    let created = agora::certs::create(&out, &config, reissue, agora::certs::Validity { days, ..Default::default() })?;
    println!(
        "{}: CA {}, issued {} certificate(s){}, admin token {}",
        out.display(),
        if created.ca_created { "created" } else { "kept" },
        created.issued.len(),
        if created.issued.is_empty() { String::new() } else { format!(" ({})", created.issued.join(", ")) },
        if created.token_created { "created" } else { "kept" }
    );
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::Node(a) => run_node(a).await,
        Cmd::Bench(a) => agora::bench::run(a).await,
        Cmd::VerifyOrders(a) => agora::verify_orders::run(a).await,
        Cmd::SoakPlot(a) => agora::soak_plot::run(a),
        Cmd::StorageUsage { data_dir } => agora::storage::usage(&data_dir).map(|u| println!("{u:#}")),
        Cmd::Config { config } => show_config(config),
        Cmd::Certs(c) => certs(c),
        Cmd::Cluster(a) => agora::launcher::run(a).await,
        // The verdict is the exit code: 0 valid, non-zero on any violation.
        Cmd::Chaos(a) => match agora::chaos::run::main(a).await {
            Ok(code) => std::process::exit(code),
            Err(e) => Err(e),
        },
    };
    if let Err(e) = r {
        eprintln!("agora: {e:#}");
        std::process::exit(1);
    }
}
