//! Coordinator replicas sharing one PostgreSQL store, as separate
//! processes on loopback, with agent processes spread over them: the
//! harness of `tests/replicas.rs` and of the replica benchmarks.

use std::path::{Path, PathBuf};

use crate::{Proc, binary, free_tcp_port, free_udp_port, init_home, run, scratch, split_data};

/// Replicas of one coordinator home on one PostgreSQL store, and agents.
pub struct ReplicaFleet {
    /// Scratch directory.
    pub dir: PathBuf,
    /// The home every replica serves (CA, credentials, settings naming the store).
    pub home: PathBuf,
    /// The store's URL (none: the embedded SQLite store of one coordinator).
    pub url: Option<String>,
    /// Each replica's QUIC address.
    pub addrs: Vec<String>,
    /// Each replica's metrics address.
    pub metrics: Vec<String>,
    /// Each replica's process, while it runs.
    pub replicas: Vec<Option<Proc>>,
    /// Agent processes, by index.
    pub agents: Vec<Option<Proc>>,
    /// The replica each agent enrolled through (and dials first).
    pub home_replica: Vec<usize>,
}

impl ReplicaFleet {
    /// A home on the PostgreSQL store at `url` and `replicas` replicas of
    /// it started (the first with `roles[0]`, and so on; `serve` by
    /// default); `devices` agents enrolled round-robin through them (not
    /// started), holding the embedded or full Fashion-MNIST training set
    /// split with Dirichlet(0.5).
    pub fn new(
        name: &str,
        url: String,
        replicas: usize,
        roles: &[&str],
        devices: usize,
        source: &str,
    ) -> Self {
        let mut fleet = Self::start(name, Some(url), replicas, roles);
        let data = fleet.dir.join("data");
        split_data(&data, devices, source, &["--partition", "dirichlet:0.5"]);
        for k in 0..devices {
            fleet.enroll_agent(&data.join(format!("device-{k}")), k % replicas);
        }
        fleet
    }

    /// A home on the store at `url` (none: SQLite, then `replicas` must be
    /// 1) and `replicas` replicas of it started, without agents.
    pub fn start(name: &str, url: Option<String>, replicas: usize, roles: &[&str]) -> Self {
        assert!(url.is_some() || replicas == 1, "SQLite has one coordinator");
        let dir = scratch(name);
        let home = dir.join("home");
        let addrs: Vec<String> = (0..replicas)
            .map(|_| format!("127.0.0.1:{}", free_udp_port()))
            .collect();
        let metrics: Vec<String> = (0..replicas)
            .map(|_| format!("127.0.0.1:{}", free_tcp_port()))
            .collect();
        let mut extra = vec!["--metrics", metrics[0].as_str()];
        if let Some(url) = &url {
            extra.extend(["--store", url.as_str()]);
        }
        init_home(&home, &addrs[0], &extra);
        let mut fleet = Self {
            dir: dir.clone(),
            home,
            url,
            addrs,
            metrics,
            replicas: (0..replicas).map(|_| None).collect(),
            agents: Vec::new(),
            home_replica: Vec::new(),
        };
        for i in 0..replicas {
            fleet.start_replica(i, roles.get(i).copied().unwrap_or("serve"));
        }
        fleet
    }

    /// The name of replica `i`.
    pub fn name(i: usize) -> String {
        format!("r{i}")
    }

    /// Starts (or restarts) replica `i` in `role` and waits until it answers.
    pub fn start_replica(&mut self, i: usize, role: &str) {
        let log = self.dir.join(format!("replica-{i}.log"));
        let name = Self::name(i);
        self.replicas[i] = Some(Proc::spawn(
            &binary("coordinator"),
            &[
                "serve",
                "--dir",
                self.home.to_str().unwrap(),
                "--replica",
                &name,
                "--role",
                role,
                "--listen",
                &self.addrs[i],
                "--metrics",
                &self.metrics[i],
            ],
            &log,
        ));
        let addr = self.addrs[i].clone();
        crate::wait_for(60, "the replica to listen", || {
            std::process::Command::new(binary("coordinator"))
                .args(["tasks", "list", "--dir", self.home.to_str().unwrap()])
                .args(["--coordinator", &addr])
                .output()
                .ok()
                .filter(|o| o.status.success())
        });
    }

    /// Kills replica `i` with SIGKILL.
    pub fn kill_replica(&mut self, i: usize) {
        if let Some(mut p) = self.replicas[i].take() {
            p.kill();
        }
    }

    /// Enrolls one more agent (state `agent-<k>`, not started) through
    /// replica `via`, holding the data directory `data`; returns its index.
    pub fn enroll_agent(&mut self, data: &Path, via: usize) -> usize {
        let k = self.agents.len();
        let token = self.admin(&["token", "create", "--label", &format!("device-{k}")]);
        let state = self.dir.join(format!("agent-{k}"));
        crate::enroll_process(&state, &self.addrs[via], &self.home, &token, data);
        self.agents.push(None);
        self.home_replica.push(via);
        k
    }

    /// Starts agent `k`, which knows every replica's address, with extra `args`.
    pub fn start_agent(&mut self, k: usize, args: &[&str]) {
        let state = self.dir.join(format!("agent-{k}"));
        let mut all = vec!["run", "--state", state.to_str().unwrap(), "--allow-battery"];
        for (i, a) in self.addrs.iter().enumerate() {
            if i != self.home_replica[k] {
                all.extend(["--replica", a.as_str()]);
            }
        }
        all.extend_from_slice(args);
        let log = self.dir.join(format!("agent-{k}.log"));
        self.agents[k] = Some(Proc::spawn(&binary("edge-agent"), &all, &log));
    }

    /// A replica that runs now.
    pub fn live(&self) -> usize {
        self.replicas
            .iter()
            .position(Option::is_some)
            .expect("a replica runs")
    }

    /// Runs an admin command through a live replica; returns stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        let addr = self.addrs[self.live()].clone();
        all.extend(["--dir", self.home.to_str().unwrap(), "--coordinator", &addr]);
        run(&binary("coordinator"), &all)
    }

    /// An admin listing as JSON.
    pub fn admin_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.admin(&all)).expect("admin JSON")
    }

    /// `coordinator status --json`, read from the store.
    pub fn status(&self) -> serde_json::Value {
        let out = run(
            &binary("coordinator"),
            &["status", "--dir", self.home.to_str().unwrap(), "--json"],
        );
        serde_json::from_str(&out).expect("status JSON")
    }

    /// The replica holding the lease of `task` now, if any.
    pub fn owner(&self, task: u64) -> Option<usize> {
        let status = self.status();
        let lease = status["leases"]
            .as_array()?
            .iter()
            .find(|l| l["task"] == task && l["held"] == true)?
            .clone();
        let name = lease["owner"].as_str()?;
        (0..self.replicas.len()).find(|&i| Self::name(i) == name)
    }

    /// Every log, for a failure's message.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for i in 0..self.replicas.len() {
            text += &format!("\n--- replica {i} ---\n");
            text += &std::fs::read_to_string(self.dir.join(format!("replica-{i}.log")))
                .unwrap_or_default();
        }
        for k in 0..self.agents.len() {
            text += &format!("\n--- agent {k} ---\n");
            text += &std::fs::read_to_string(self.dir.join(format!("agent-{k}.log")))
                .unwrap_or_default();
        }
        text
    }

    /// Waits until task `id` is finished (or panics after `secs`, with the logs).
    pub fn wait_finished(&self, id: u64, secs: u64) {
        crate::wait_task_finished(
            || self.admin_json(&["tasks", "list"]),
            id,
            secs,
            || self.logs(),
        );
    }

    /// The closed rounds of `task`: round number, model (hex id) and
    /// participants as recorded (in the order the round counted them).
    pub fn closed_rounds(&self, task: u64) -> Vec<(u64, String, Vec<u64>)> {
        self.admin_json(&["rounds", &task.to_string()])
            .as_array()
            .expect("a list of rounds")
            .iter()
            .filter(|r| r["outcome"] == "closed")
            .map(|r| {
                (
                    r["round"].as_u64().expect("round"),
                    r["model"].as_str().expect("model").to_string(),
                    r["participants"]
                        .as_array()
                        .expect("participants")
                        .iter()
                        .map(|v| v.as_u64().expect("device"))
                        .collect(),
                )
            })
            .collect()
    }

    /// A connection to the store (outside any async runtime).
    pub fn db(&self) -> postgres::Client {
        self.url
            .as_deref()
            .expect("a PostgreSQL store")
            .parse::<postgres::Config>()
            .expect("the store's URL")
            .connect(postgres::NoTls)
            .expect("the store")
    }

    /// The parameters of model version `id`, from the store.
    pub fn model(&self, id: &str) -> Vec<f32> {
        let id = fleet_protocol::message::ObjectId::from_hex(id).expect("a model id");
        let row = self
            .db()
            .query_one("SELECT bytes FROM objects WHERE id = $1", &[&id.0.to_vec()])
            .expect("the model's object");
        fleet_protocol::message::bytes_to_params(&row.get::<_, Vec<u8>>(0)).expect("f32 model")
    }
}

/// Recomputes every closed round of `task` in memory with the coordinator's
/// own task core, each device's update made from its agent's data exactly
/// as the agent makes it, and checks that each recorded model is the one
/// the replay computes (to float summation order).
pub fn assert_replayed(fleet: &ReplicaFleet, task: u64) {
    let mut db = fleet.db();
    let spec: fleet_protocol::task::TaskSpec = serde_json::from_str(
        &db.query_one("SELECT spec FROM tasks WHERE id = $1", &[&(task as i64)])
            .expect("the task")
            .get::<_, String>(0),
    )
    .expect("the task's definition");
    let initial: Vec<u8> = db
        .query_one(
            "SELECT id FROM models WHERE task = $1 AND round = 0",
            &[&(task as i64)],
        )
        .expect("the initial model")
        .get(0);
    let initial =
        fleet.model(&fleet_protocol::message::ObjectId(initial.try_into().unwrap()).to_string());
    let closed = fleet.closed_rounds(task);
    let models: Vec<Vec<f32>> = closed.iter().map(|r| fleet.model(&r.1)).collect();
    let rounds: Vec<fleet_sim::network::ClosedRound<'_>> = closed
        .iter()
        .zip(&models)
        .map(|(r, m)| fleet_sim::network::ClosedRound {
            round: r.0,
            devices: r.2.clone(),
            model: m,
        })
        .collect();
    // Each device's data, by device id (from its agent's state).
    let mut data = std::collections::HashMap::new();
    for k in 0..fleet.agents.len() {
        let id = fleet_edge_agent::state::StateDir::at(fleet.dir.join(format!("agent-{k}")))
            .identity()
            .expect("the agent's identity")
            .device;
        let set =
            fleet_models::data::device::load(&fleet.dir.join("data").join(format!("device-{k}")))
                .expect("the agent's data");
        data.insert(id, set);
    }
    let replayed = fleet_sim::network::replay_rounds(
        &spec,
        &initial,
        &rounds,
        &fleet_aggregation::compute::Cpu,
        |id, plan, global| {
            let set = data
                .get(&id)
                .ok_or_else(|| format!("no data of device {id}"))?;
            fleet_edge_agent::work::plan_update(plan, id, global, set.view(), |_| {})
        },
    )
    .expect("the replay");
    assert_eq!(replayed.len(), closed.len());
    for (round, diff, _) in &replayed {
        eprintln!("round {round}: replayed model within {diff:.3e} of the recorded one");
        assert!(*diff <= 1e-5, "round {round}: the replay differs by {diff}");
    }
}
