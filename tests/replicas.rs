//! Two fleet-server replicas on one Mosquitto and one PostgreSQL. MQTT shared
//! subscriptions split the telemetry between them. Killing one mid-stream loses nothing
//! and stores nothing twice, because unacknowledged messages stay in the killed
//! replica's broker session until it comes back.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Api, Process, Workspace, free_port, unique_device_id, wait_for};
use sqlx::{Connection, Executor, PgConnection};

const BROKER: &str = "mqtt://127.0.0.1:1883";
const DEVICES: usize = 4;

/// A PostgreSQL schema of its own, dropped at the end.
struct Schema {
    server: String,
    name: String,
}

impl Schema {
    fn create() -> Schema {
        let server = std::env::var("FLEET_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = unique_device_id("replicas").replace('-', "_");
        execute(&server, &format!("CREATE SCHEMA {name}"));
        Schema { server, name }
    }

    fn url(&self) -> String {
        let separator = if self.server.contains('?') { '&' } else { '?' };
        format!(
            "{}{separator}options[search_path]={}",
            self.server, self.name
        )
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        execute(&self.server, &format!("DROP SCHEMA {} CASCADE", self.name));
    }
}

fn execute(server: &str, statement: &str) {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut connection = PgConnection::connect(server)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {server} is not reachable: {e}"));
        connection.execute(statement).await.unwrap();
        connection.close().await.unwrap();
    });
}

/// Starts one replica with a persistent broker session under `client_id`.
fn start_replica(database: &str, group: &str, client_id: &str, http_port: u16) -> Process {
    let http = format!("127.0.0.1:{http_port}");
    let child = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args([
            "server",
            "--broker",
            BROKER,
            "--http",
            &http,
            "--database",
            database,
        ])
        .args(["--shared-group", group, "--mqtt-client-id", client_id])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut process = Process {
        name: client_id.into(),
        child,
    };
    wait_for(Duration::from_secs(30), "a replica to start", || {
        assert!(
            process.is_running(),
            "replica {client_id} exited during startup"
        );
        ureq::get(&format!("http://{http}/healthz")).call().ok()
    });
    process
}

fn stored_by(http_port: u16) -> f64 {
    // /metrics needs no token.
    let api = Api {
        base: format!("http://127.0.0.1:{http_port}"),
        token: String::new(),
    };
    api.metric("fleet_ingest_messages_total{outcome=\"stored\"}")
}

/// Connects with clean sessions under the replicas' client ids, which makes the
/// broker discard the sessions the test created.
fn discard_sessions(client_ids: &[String]) {
    for id in client_ids {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", 1883);
        options.set_clean_session(true);
        let (client, mut connection) = rumqttc::Client::new(options, 4);
        for event in connection.iter() {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) = event {
                break;
            }
        }
        let _ = client.disconnect();
    }
}

#[test]
fn replicas_split_load_and_survive_a_kill() {
    let workspace = Workspace::new();
    let schema = Schema::create();
    let database = schema.url();
    let group = unique_device_id("group");
    let client_ids = [unique_device_id("replica-a"), unique_device_id("replica-b")];
    let (port_a, port_b) = (free_port(), free_port());
    let mut replica_a = start_replica(&database, &group, &client_ids[0], port_a);
    let _replica_b = start_replica(&database, &group, &client_ids[1], port_b);

    let ids: Vec<String> = (0..DEVICES)
        .map(|i| unique_device_id(&format!("replicated-{i}")))
        .collect();
    let mut devices: Vec<Process> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let shard = format!("{i}/{DEVICES}");
            workspace.start_device(
                id,
                BROKER,
                &["--shard", &shard, "--rate", "200", "--interval", "0.05"],
            )
        })
        .collect();

    std::thread::sleep(Duration::from_secs(3));
    let stored_by_a = stored_by(port_a);
    replica_a.child.kill().unwrap();
    replica_a.child.wait().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let _replica_a = start_replica(&database, &group, &client_ids[0], port_a);
    std::thread::sleep(Duration::from_secs(3));

    for device in &mut devices {
        assert!(device.terminate().success(), "{} failed", device.name);
    }
    // Each agent's state folder contains the last sequence number it used.
    let sent: Vec<i64> = ids
        .iter()
        .map(|id| {
            let path = workspace.path(&format!("state/{id}/telemetry.seq"));
            std::fs::read_to_string(path)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();

    let token_dir = tempfile::tempdir().unwrap();
    let observer = Api {
        base: format!("http://127.0.0.1:{port_b}"),
        token: common::create_api_token(&database, &token_dir.path().join("token")),
    };
    wait_for(
        Duration::from_secs(60),
        "every message to be stored",
        || {
            ids.iter()
                .zip(&sent)
                .all(|(id, &sent)| observer.device(id).is_some_and(|d| d["messages"] == sent))
                .then_some(())
        },
    );
    for id in &ids {
        let device = observer.device(id).unwrap();
        assert_eq!(device["gaps"], 0, "{device}");
        let seqs = observer.stored_seqs(id);
        let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(seqs, expected, "{id} stored a message twice or lost one");
    }
    let total: i64 = sent.iter().sum();
    let stored_by_b = stored_by(port_b);
    assert!(
        stored_by_a > 0.0,
        "replica A stored nothing before it was killed"
    );
    assert!(stored_by_b > 0.0, "replica B stored nothing");
    assert!(
        stored_by_b < total as f64,
        "replica B stored everything ({stored_by_b} of {total}): no split"
    );

    discard_sessions(&client_ids);
    common::clear_retained_status("127.0.0.1", 1883, &ids);
}
