//! The fake internet's authoritative DNS server: a fixed zone of A records answered over UDP,
//! parsed and built with hickory-proto. Unknown names are NXDOMAIN; known names asked for another type
//! get an empty NOERROR answer.

use std::net::Ipv4Addr;
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
use tokio::net::UdpSocket;

/// One A record of the fake zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneEntry {
    /// The name, without a trailing dot (`allowed.example`).
    pub name: String,
    pub address: Ipv4Addr,
    /// Seconds.
    pub ttl: u32,
}

impl ZoneEntry {
    pub fn new(name: &str, address: Ipv4Addr, ttl: u32) -> ZoneEntry {
        ZoneEntry {
            name: name.trim_end_matches('.').to_ascii_lowercase(),
            address,
            ttl,
        }
    }
}

/// Answers queries on `socket` for ever.
pub async fn serve(socket: UdpSocket, zone: Arc<Vec<ZoneEntry>>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(answer) = answer(&buf[..n], &zone) {
            let _ = socket.send_to(&answer, peer).await;
        }
    }
}

/// The wire answer to one query message; `None` for bytes that are not a query.
pub fn answer(query: &[u8], zone: &[ZoneEntry]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    if request.message_type() != MessageType::Query {
        return None;
    }
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_authoritative(true)
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true);
    let Some(question) = request.queries().first() else {
        response.set_response_code(ResponseCode::FormErr);
        return response.to_vec().ok();
    };
    response.add_query(question.clone());
    if request.op_code() != OpCode::Query {
        response.set_response_code(ResponseCode::NotImp);
        return response.to_vec().ok();
    }
    let name = question
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let matches: Vec<&ZoneEntry> = zone.iter().filter(|e| e.name == name).collect();
    if matches.is_empty() {
        response.set_response_code(ResponseCode::NXDomain);
    } else if question.query_type() == RecordType::A {
        for entry in matches {
            let rdata = RData::A(A(entry.address));
            response.add_answer(Record::from_rdata(
                question.name().clone(),
                entry.ttl,
                rdata,
            ));
        }
    }
    response.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut message = Message::new();
        message
            .set_id(4242)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_str(name).unwrap(), kind));
        message.to_vec().unwrap()
    }

    #[test]
    fn answers_known_names_and_refuses_unknown_ones() {
        let zone = [ZoneEntry::new(
            "a.example",
            Ipv4Addr::new(198, 51, 100, 10),
            60,
        )];
        let found = Message::from_vec(&answer(&query("A.Example.", RecordType::A), &zone).unwrap())
            .unwrap();
        assert_eq!(found.id(), 4242);
        assert_eq!(found.response_code(), ResponseCode::NoError);
        assert_eq!(found.answers().len(), 1);
        assert_eq!(found.answers()[0].ttl(), 60);
        let missing =
            Message::from_vec(&answer(&query("b.example.", RecordType::A), &zone).unwrap())
                .unwrap();
        assert_eq!(missing.response_code(), ResponseCode::NXDomain);
        let aaaa =
            Message::from_vec(&answer(&query("a.example.", RecordType::AAAA), &zone).unwrap())
                .unwrap();
        assert_eq!(aaaa.response_code(), ResponseCode::NoError);
        assert!(aaaa.answers().is_empty());
        assert!(answer(b"junk", &zone).is_none());
    }
}
