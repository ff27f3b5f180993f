//! Identity and access across processes: device credentials and topic rules on the
//! embedded broker and on a Mosquitto configured from the generated password and ACL
//! files, and operator authentication on the HTTP API.

mod common;

use std::time::Duration;

use common::{Workspace, free_port, path_str, unique_device_id, wait_for};
use rumqttc::{Client, ConnectReturnCode, Connection, ConnectionError, Event, MqttOptions, Packet};
use rumqttc::{QoS, SubscribeReasonCode};

fn read_secret(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

fn mqtt_client(port: u16, client_id: &str, login: Option<(&str, &str)>) -> (Client, Connection) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    if let Some((username, password)) = login {
        options.set_credentials(username, password);
    }
    Client::new(options, 16)
}

/// Connects and returns the CONNACK outcome: `Ok` with the connection, or the return code.
fn connect(
    port: u16,
    client_id: &str,
    login: Option<(&str, &str)>,
) -> Result<(Client, Connection), ConnectReturnCode> {
    let (client, mut connection) = mqtt_client(port, client_id, login);
    for event in connection.iter() {
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok((client, connection)),
            Ok(_) => continue,
            Err(ConnectionError::ConnectionRefused(code)) => return Err(code),
            Err(error) => panic!("{client_id}: connection failed: {error}"),
        }
    }
    unreachable!("the event iterator never ends")
}

/// Polls until the broker closes the connection, failing if it stays open.
fn expect_disconnect(connection: &mut Connection, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        match connection.recv_timeout(Duration::from_millis(500)) {
            Ok(Ok(_)) | Err(_) => continue,
            Ok(Err(_)) => return,
        }
    }
    panic!("the broker kept the connection open after {what}");
}

/// Polls until the SUBACK of the first subscribe arrives and returns its reason code.
fn suback(connection: &mut Connection) -> SubscribeReasonCode {
    for event in connection.iter() {
        if let Packet::SubAck(ack) = match event.expect("broker connection") {
            Event::Incoming(packet) => packet,
            Event::Outgoing(_) => continue,
        } {
            return ack.return_codes[0];
        }
    }
    unreachable!("the event iterator never ends")
}

/// Polls until a publish arrives and returns its topic.
fn first_publish(connection: &mut Connection) -> String {
    for event in connection.iter() {
        if let Event::Incoming(Packet::Publish(publish)) = event.expect("broker connection") {
            return publish.topic;
        }
    }
    unreachable!("the event iterator never ends")
}

fn wait_for_puback(connection: &mut Connection) {
    for event in connection.iter() {
        if let Event::Incoming(Packet::PubAck(_)) = event.expect("broker connection") {
            return;
        }
    }
}

#[test]
fn embedded_broker_enforces_credentials_and_topics() {
    let workspace = Workspace::new();
    let mqtt_port = free_port();
    let server = workspace.start_server(None, mqtt_port);
    let broker = format!("mqtt://127.0.0.1:{mqtt_port}");
    let own = unique_device_id("own");
    let other = unique_device_id("other");
    let database = std::path::PathBuf::from(&server.database);
    workspace.provision_device(&database, &other);

    // The harness provisions the agent's device, so its secret is read afterwards.
    let _agent = workspace.start_device(&own, &broker, &["--interval", "0.3"]);
    let secret = read_secret(&workspace.path(&format!("secrets/{own}.secret")));
    wait_for(Duration::from_secs(60), "telemetry from the agent", || {
        server
            .device(&own)
            .filter(|d| d["inferences"].as_i64().unwrap_or(0) > 0)
    });

    let refusals = [
        (own.as_str(), None, ConnectReturnCode::NotAuthorized),
        (
            own.as_str(),
            Some("guess"),
            ConnectReturnCode::BadUserNamePassword,
        ),
        (
            other.as_str(),
            Some(secret.as_str()),
            ConnectReturnCode::BadClientId,
        ),
    ];
    for (client_id, password, expected) in refusals {
        let login = password.map(|password| (own.as_str(), password));
        let refused = connect(mqtt_port, client_id, login).err();
        assert_eq!(refused, Some(expected), "client id {client_id}");
    }

    let (client, mut connection) =
        connect(mqtt_port, &own, Some((&own, &secret))).expect("own credentials");
    client
        .publish(
            format!("fleet/v1/{other}/telemetry"),
            QoS::AtLeastOnce,
            false,
            b"forged".to_vec(),
        )
        .unwrap();
    expect_disconnect(&mut connection, "a publish under another device's id");

    let (client, mut connection) =
        connect(mqtt_port, &own, Some((&own, &secret))).expect("own credentials");
    client
        .subscribe(format!("fleet/v1/{other}/cmd"), QoS::AtLeastOnce)
        .unwrap();
    expect_disconnect(&mut connection, "a subscribe to another device's commands");

    let (client, mut connection) =
        connect(mqtt_port, &own, Some((&own, &secret))).expect("own credentials");
    client
        .subscribe(format!("fleet/v1/{own}/cmd"), QoS::AtLeastOnce)
        .unwrap();
    assert_eq!(
        suback(&mut connection),
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    drop(client);

    assert_eq!(server.metric("fleet_broker_acl_denied_total"), 2.0);
    assert_eq!(
        server.metric("fleet_ingest_messages_total{outcome=\"rejected\"}"),
        0.0,
        "the forged message reached the ingester"
    );
    assert!(
        server.device(&other).is_none(),
        "the forged device was stored"
    );
    assert!(server.metric("fleet_broker_logins_refused_total") >= 3.0);

    let output = common::fleet(&["server", "revoke", &own, "--database", &server.database]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let refused = connect(mqtt_port, &own, Some((&own, &secret))).err();
    assert_eq!(refused, Some(ConnectReturnCode::BadUserNamePassword));
}

#[test]
fn mosquitto_enforces_generated_files() {
    let workspace = Workspace::new();
    let database = workspace.path("fleet.db");
    let database = path_str(&database);
    let own = unique_device_id("mosq-own");
    let other = unique_device_id("mosq-other");
    let ingester = unique_device_id("ingester");
    let own_secret = read_secret(&workspace.provision_device(database.as_ref(), &own));
    let ingester_secret = workspace.path("ingester.secret");
    let output = common::fleet(&[
        "server",
        "provision-ingester",
        &ingester,
        "--out",
        path_str(&ingester_secret),
        "--database",
        database,
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let broker_dir = tempfile::tempdir().unwrap();
    let output = common::fleet(&[
        "server",
        "mosquitto-config",
        "--out",
        path_str(broker_dir.path()),
        "--database",
        database,
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    let settings: String = printed
        .lines()
        .filter(|line| {
            ["allow_anonymous", "password_file", "acl_file"]
                .iter()
                .any(|key| line.starts_with(key))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    assert_eq!(
        settings.lines().count(),
        3,
        "mosquitto.conf lines in:\n{printed}"
    );
    let (_mosquitto, port) = common::start_mosquitto(broker_dir.path(), &settings);
    let broker = format!("mqtt://127.0.0.1:{port}");

    let token = common::create_api_token(database, &workspace.path("token"));
    let http = format!("127.0.0.1:{}", free_port());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(["server", "--broker", &broker, "--http", &http])
        .args(["--mqtt-clean-session", "--shared-group", "fleet"])
        .args(["--mqtt-username", &ingester])
        .args(["--mqtt-password-file", path_str(&ingester_secret)])
        .args(["--database", database])
        .spawn()
        .unwrap();
    let _server = common::Process {
        name: "fleet server".into(),
        child,
    };
    let api = common::Api {
        base: format!("http://{http}"),
        token,
    };
    wait_for(Duration::from_secs(30), "the server to log in", || {
        ureq::get(&format!("{}/healthz", api.base)).call().ok()
    });

    let secret_file = workspace.path(&format!("secrets/{own}.secret"));
    let login = [
        "--username",
        &own,
        "--password-file",
        path_str(&secret_file),
    ];
    let _agent = workspace.start_device(
        &own,
        &broker,
        &[&["--interval", "0.3"][..], &login].concat(),
    );
    wait_for(
        Duration::from_secs(60),
        "telemetry through Mosquitto",
        || {
            api.device(&own)
                .filter(|d| d["inferences"].as_i64().unwrap_or(0) > 0)
        },
    );

    // Mosquitto 2.0 grants a subscribe outside the ACL but delivers nothing on it. The
    // ingester sends a command to the other device and then one to this device; both
    // subscriptions are on one connection, so the first delivery shows what got through.
    let (client, mut connection) =
        connect(port, &own, Some((&own, &own_secret))).expect("own credentials");
    for device in [&other, &own] {
        client
            .subscribe(format!("fleet/v1/{device}/cmd"), QoS::AtLeastOnce)
            .unwrap();
        assert!(matches!(
            suback(&mut connection),
            SubscribeReasonCode::Success(_)
        ));
    }
    let ingester_password = read_secret(&ingester_secret);
    let (sender, mut sender_connection) =
        connect(port, &ingester, Some((&ingester, &ingester_password))).expect("ingester login");
    for device in [&other, &own] {
        let topic = format!("fleet/v1/{device}/cmd");
        sender
            .publish(topic, QoS::AtLeastOnce, false, b"command".to_vec())
            .unwrap();
        wait_for_puback(&mut sender_connection);
    }
    let delivered = first_publish(&mut connection);
    assert_eq!(delivered, format!("fleet/v1/{own}/cmd"));

    // Mosquitto acknowledges a denied MQTT 3.1.1 publish and drops it. The undecodable
    // message sent next on the device's own topic is delivered after it, in order, so
    // once the server has rejected exactly one message, the forged one never arrived.
    for topic in [
        format!("fleet/v1/{other}/telemetry"),
        format!("fleet/v1/{own}/telemetry"),
    ] {
        client
            .publish(topic, QoS::AtLeastOnce, false, b"not postcard".to_vec())
            .unwrap();
        wait_for_puback(&mut connection);
    }
    let rejected = "fleet_ingest_messages_total{outcome=\"rejected\"}";
    wait_for(Duration::from_secs(20), "the undecodable message", || {
        (api.metric(rejected) >= 1.0).then_some(())
    });
    assert_eq!(
        api.metric(rejected),
        1.0,
        "the forged message was delivered"
    );
    assert!(api.device(&other).is_none());

    let unknown = connect(port, &other, Some((&other, "guess"))).err();
    assert_eq!(unknown, Some(ConnectReturnCode::NotAuthorized));
}

#[test]
fn api_requires_an_operator() {
    let workspace = Workspace::new();
    let mqtt_port = free_port();
    let server = workspace.start_server(None, mqtt_port);
    let device = unique_device_id("api-device");
    let device_secret =
        read_secret(&workspace.provision_device(std::path::Path::new(&server.database), &device));
    let devices = format!("{}/api/devices", server.base);
    let status = |request: ureq::Request| match request.call() {
        Ok(response) => response.status(),
        Err(ureq::Error::Status(status, _)) => status,
        Err(error) => panic!("request failed: {error}"),
    };
    let bearer = |token: &str| ureq::get(&devices).set("Authorization", &format!("Bearer {token}"));

    assert_eq!(status(ureq::get(&devices)), 401);
    assert_eq!(status(bearer("not-a-token")), 401);
    assert_eq!(status(bearer(&device_secret)), 403);
    assert_eq!(status(bearer(&server.token)), 200);
    assert_eq!(status(ureq::get(&format!("{}/healthz", server.base))), 200);

    let password_file = workspace.path("operator-password");
    std::fs::write(&password_file, "short\n").unwrap();
    let set_password = |name: &str| {
        common::fleet(&[
            "server",
            "set-operator-password",
            name,
            "--password-file",
            path_str(&password_file),
            "--database",
            &server.database,
        ])
    };
    let output = set_password("bob");
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("at least 12"), "{message}");
    std::fs::write(&password_file, "a long enough password\n").unwrap();
    assert!(set_password("bob").status.success());

    // Boxed: ureq's error is large, and clippy requires small error variants.
    let login = |password: &str| {
        ureq::post(&format!("{}/api/login", server.base))
            .send_json(serde_json::json!({
                "username": "bob",
                "password": password,
            }))
            .map_err(Box::new)
    };
    match login("wrong password").map_err(|error| *error) {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("a wrong password was not refused: {other:?}"),
    }
    let response = login("a long enough password").expect("login");
    let cookie = response.header("set-cookie").unwrap_or_default().to_owned();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    let session: serde_json::Value = response.into_json().unwrap();
    let session = session["token"].as_str().unwrap().to_owned();
    assert_eq!(status(bearer(&session)), 200);
    let cookie_request = ureq::get(&devices).set("Cookie", &format!("fleet_session={session}"));
    assert_eq!(status(cookie_request), 200);
    let logout = ureq::post(&format!("{}/api/logout", server.base))
        .set("Authorization", &format!("Bearer {session}"));
    assert_eq!(status(logout), 204);
    assert_eq!(status(bearer(&session)), 401);

    // Throttled after ten attempts a minute for one name.
    let throttled = (0..12).find_map(|_| match login("wrong password").map_err(|error| *error) {
        Err(ureq::Error::Status(429, response)) => Some(response),
        _ => None,
    });
    let throttled = throttled.expect("login attempts were never throttled");
    let retry_after: u64 = throttled.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");

    let stored = std::fs::read(&server.database).unwrap();
    let wal = std::fs::read(format!("{}-wal", server.database)).unwrap_or_default();
    for secret in [&server.token, &device_secret, &session] {
        let found = [&stored, &wal]
            .iter()
            .any(|bytes| bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
        assert!(!found, "a secret is stored in plain text");
    }
}
