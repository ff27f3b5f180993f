//! The embedded broker's front door: a TCP proxy that authenticates each MQTT client
//! and enforces the topic rules of [`crate::access::acl`] before traffic reaches
//! rumqttd.
//!
//! rumqttd 0.20 checks user names and passwords through a callback but has no topic
//! authorization, so these rules cannot live inside it. The proxy reads the client's
//! packets with rumqttc's MQTT 3.1.1 codec and forwards each permitted packet's
//! original bytes unchanged; the broker's packets go back to the client as a plain
//! byte stream. rumqttd itself listens on a loopback port and accepts only the proxy,
//! which replaces the client's password with a per-process secret, and the server's
//! own ingester.
//!
//! A client that publishes or subscribes outside its rights is disconnected, as AWS
//! IoT Core does: MQTT 3.1.1 has no negative acknowledgement for a publish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rumqttc::mqttbytes::{self, v4};
use rumqttc::{ConnAck, ConnectReturnCode, Login, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::ServerMetrics;
use crate::access::{self, Principal, acl};
use crate::store::Store;

/// How long a new connection may take to send its CONNECT packet.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Prefix the device agent puts before its device id in the MQTT client id.
pub const AGENT_CLIENT_ID_PREFIX: &str = "fleet-device-";

/// Access rule for clients of the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAccess {
    /// Every client needs a provisioned credential and stays within its topics.
    Credentials,
    /// Clients without a user name connect with no topic rules; clients that send one
    /// are still checked. For closed test and benchmark setups only.
    AllowAnonymous,
}

/// Settings shared by every proxied connection.
#[derive(Debug, Clone)]
pub struct ProxyContext {
    pub upstream: SocketAddr,
    /// Password rumqttd accepts; only the proxy and the server's ingester know it.
    pub upstream_password: Arc<str>,
    pub access: ClientAccess,
    pub max_packet_bytes: usize,
    pub store: Store,
    pub metrics: Arc<ServerMetrics>,
}

/// Reason a connection was closed before or after it reached the broker.
#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("network error")]
    Io(#[from] std::io::Error),
    #[error("invalid MQTT packet: {0:?}")]
    Mqtt(mqttbytes::Error),
    #[error("the first packet was not CONNECT")]
    NotConnect,
    #[error(
        "the client speaks MQTT 5, and the embedded broker speaks MQTT 3.1.1 only; start \
         agents with --mqtt-version 3.1.1, or use a broker that speaks MQTT 5"
    )]
    Mqtt5,
    #[error("no CONNECT within {}s", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout,
    #[error("login refused: {0}")]
    Refused(&'static str),
    #[error("not allowed to publish to {topic:?}")]
    PublishDenied { topic: String },
    #[error("not allowed to subscribe to {filter:?}")]
    SubscribeDenied { filter: String },
    #[error("a second CONNECT on one connection")]
    RepeatedConnect,
}

/// Accepts clients on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    context: ProxyContext,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let context = context.clone();
                tokio::spawn(async move {
                    if let Err(error) = serve_client(stream, &context).await {
                        log_closed(&context, peer, &error);
                    }
                });
            }
            Err(error) => {
                // Running out of file descriptors is the usual cause; pause instead of
                // spinning on the same error.
                tracing::warn!(%error, "MQTT accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn log_closed(context: &ProxyContext, peer: SocketAddr, error: &ProxyError) {
    match error {
        ProxyError::Refused(_)
        | ProxyError::NotConnect
        | ProxyError::ConnectTimeout
        | ProxyError::Mqtt5 => {
            context.metrics.broker_logins_refused.inc();
            tracing::warn!(%peer, error = %error, "MQTT connection refused");
        }
        ProxyError::PublishDenied { .. } | ProxyError::SubscribeDenied { .. } => {
            context.metrics.broker_acl_denied.inc();
            tracing::warn!(%peer, error = %error, "MQTT client disconnected");
        }
        ProxyError::Io(_) => tracing::debug!(%peer, error = %error, "MQTT connection closed"),
        ProxyError::Mqtt(_) | ProxyError::RepeatedConnect => {
            tracing::warn!(%peer, error = %error, "MQTT client disconnected")
        }
    }
}

async fn serve_client(stream: TcpStream, context: &ProxyContext) -> Result<(), ProxyError> {
    stream.set_nodelay(true)?;
    let (mut client_read, mut client_write) = stream.into_split();
    let mut buffer = BytesMut::with_capacity(4096);
    let first = tokio::time::timeout(
        CONNECT_TIMEOUT,
        read_packet(&mut client_read, &mut buffer, context.max_packet_bytes),
    )
    .await
    .map_err(|_| ProxyError::ConnectTimeout)?;
    let speaks_mqtt5 = match &first {
        Err(ProxyError::Mqtt5) => true,
        Ok(Some((Packet::Connect(connect), _))) => connect.protocol == mqttbytes::Protocol::V5,
        _ => false,
    };
    if speaks_mqtt5 {
        // The specification lets a server that does not speak MQTT 5 refuse such a
        // client with this 3.1.1 acknowledgement.
        let mut refusal = BytesMut::new();
        ConnAck::new(ConnectReturnCode::RefusedProtocolVersion, false)
            .write(&mut refusal)
            .map_err(ProxyError::Mqtt)?;
        client_write.write_all(&refusal).await?;
        return Err(ProxyError::Mqtt5);
    }
    let Some((Packet::Connect(mut connect), _)) = first? else {
        return Err(ProxyError::NotConnect);
    };

    let principal = match admit(&connect, context).await {
        Ok(principal) => principal,
        Err((code, reason)) => {
            let mut refusal = BytesMut::new();
            ConnAck::new(code, false)
                .write(&mut refusal)
                .map_err(ProxyError::Mqtt)?;
            client_write.write_all(&refusal).await?;
            return Err(ProxyError::Refused(reason));
        }
    };

    let upstream = TcpStream::connect(context.upstream).await?;
    upstream.set_nodelay(true)?;
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let username = match &principal {
        Some(Principal::Device { id }) => id.clone(),
        Some(Principal::Ingester { name }) => name.clone(),
        Some(Principal::Operator { name }) => name.clone(),
        None => connect.client_id.clone(),
    };
    connect.login = Some(Login::new(username, context.upstream_password.to_string()));
    let mut rewritten = BytesMut::new();
    connect.write(&mut rewritten).map_err(ProxyError::Mqtt)?;
    upstream_write.write_all(&rewritten).await?;

    let downstream = tokio::io::copy(&mut upstream_read, &mut client_write);
    let upstream = forward_checked(
        &mut client_read,
        &mut upstream_write,
        buffer,
        principal.as_ref(),
        context.max_packet_bytes,
    );
    tokio::select! {
        copied = downstream => copied.map(|_| ()).map_err(ProxyError::from),
        forwarded = upstream => forwarded,
    }
}

/// Decides whether a CONNECT may reach the broker: `Ok(None)` admits an anonymous
/// client without topic rules, `Ok(Some(_))` an authenticated one.
async fn admit(
    connect: &v4::Connect,
    context: &ProxyContext,
) -> Result<Option<Principal>, (ConnectReturnCode, &'static str)> {
    let Some(login) = &connect.login else {
        return match context.access {
            ClientAccess::AllowAnonymous => Ok(None),
            ClientAccess::Credentials => {
                Err((ConnectReturnCode::NotAuthorized, "no user name or password"))
            }
        };
    };
    let principal = access::check_broker_login(&context.store, &login.username, &login.password)
        .await
        .map_err(|error| {
            tracing::error!(error = %error, "credential lookup failed");
            (
                ConnectReturnCode::ServiceUnavailable,
                "credential lookup failed",
            )
        })?
        .ok_or((
            ConnectReturnCode::BadUserNamePassword,
            "unknown user name or wrong password",
        ))?;
    if let Principal::Device { id } = &principal {
        // rumqttd drops an older connection when a new one takes its client id, so a
        // device may use only ids derived from its own.
        let own = connect.client_id == *id
            || connect.client_id.strip_prefix(AGENT_CLIENT_ID_PREFIX) == Some(id);
        if !own {
            return Err((
                ConnectReturnCode::BadClientId,
                "client id does not match the device id",
            ));
        }
    }
    if let Some(will) = &connect.last_will
        && !acl::may_publish(&principal, &will.topic)
    {
        return Err((
            ConnectReturnCode::NotAuthorized,
            "last will topic outside the client's rights",
        ));
    }
    Ok(Some(principal))
}

/// Forwards the client's packets to the broker until either side closes, checking each
/// publish and subscribe against `principal` (no checks when it is `None`).
async fn forward_checked(
    client: &mut OwnedReadHalf,
    upstream: &mut OwnedWriteHalf,
    mut buffer: BytesMut,
    principal: Option<&Principal>,
    max_packet_bytes: usize,
) -> Result<(), ProxyError> {
    loop {
        let Some((packet, frame)) = read_packet(client, &mut buffer, max_packet_bytes).await?
        else {
            return Ok(());
        };
        if let Some(principal) = principal {
            check_packet(principal, &packet)?;
        }
        upstream.write_all(&frame).await?;
    }
}

fn check_packet(principal: &Principal, packet: &Packet) -> Result<(), ProxyError> {
    match packet {
        Packet::Publish(publish) if !acl::may_publish(principal, &publish.topic) => {
            Err(ProxyError::PublishDenied {
                topic: publish.topic.clone(),
            })
        }
        Packet::Subscribe(subscribe) => {
            match subscribe
                .filters
                .iter()
                .find(|filter| !acl::may_subscribe(principal, &filter.path))
            {
                Some(filter) => Err(ProxyError::SubscribeDenied {
                    filter: filter.path.clone(),
                }),
                None => Ok(()),
            }
        }
        Packet::Connect(_) => Err(ProxyError::RepeatedConnect),
        _ => Ok(()),
    }
}

/// Reads the next whole packet, returning it decoded and as its original bytes, or
/// `None` when the client closed the connection between packets.
/// Returns the protocol level of the CONNECT packet at the start of `buffer`: 4 for
/// MQTT 3.1.1, 5 for MQTT 5.
fn connect_protocol_level(buffer: &[u8]) -> Option<u8> {
    if buffer.first()? >> 4 != 1 {
        return None;
    }
    // The remaining length takes 1 to 4 bytes, each but the last with its top bit set.
    let length_bytes = buffer[1..]
        .iter()
        .take(4)
        .position(|byte| byte & 0x80 == 0)?
        + 1;
    // Then the protocol name "MQTT" with its 2-byte length, then the level.
    let name_start = 1 + length_bytes;
    if buffer.get(name_start..name_start + 6)? != b"\0\x04MQTT" {
        return None;
    }
    buffer.get(name_start + 6).copied()
}

async fn read_packet(
    reader: &mut OwnedReadHalf,
    buffer: &mut BytesMut,
    max_packet_bytes: usize,
) -> Result<Option<(Packet, BytesMut)>, ProxyError> {
    loop {
        match mqttbytes::check(buffer.iter(), max_packet_bytes) {
            Ok(header) => {
                let frame = buffer.split_to(header.frame_length());
                let mut decoding = frame.clone();
                let packet = v4::read(&mut decoding, max_packet_bytes).map_err(|error| {
                    if connect_protocol_level(&frame) == Some(5) {
                        ProxyError::Mqtt5
                    } else {
                        ProxyError::Mqtt(error)
                    }
                })?;
                return Ok(Some((packet, frame)));
            }
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(error) => return Err(ProxyError::Mqtt(error)),
        }
        if reader.read_buf(buffer).await? == 0 {
            return if buffer.has_remaining() {
                Err(ProxyError::Io(std::io::ErrorKind::UnexpectedEof.into()))
            } else {
                Ok(None)
            };
        }
    }
}
