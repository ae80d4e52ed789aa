//! Health shared through gossip: publish this node's verdicts (`hc/<backend>` = up|down,
//! written when they change) and fold live peers' verdicts into each backend's `peer_down`.
//! Keys of dead peers drop out with the peer (chitchat's live set), so they expire.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::gossip::Gossip;
use crate::proxy::DataPlane;

pub const KEY_PREFIX: &str = "hc/";

pub async fn run(data: Arc<DataPlane>, gossip: Arc<Gossip>) {
    let mut published: HashMap<String, bool> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let runtimes = data.backends.all();

        let mut changes = Vec::new();
        for rt in &runtimes {
            let down = rt.health.local_verdict_down();
            if published.get(&rt.id) != Some(&down) {
                published.insert(rt.id.clone(), down);
                changes.push((
                    format!("{KEY_PREFIX}{}", rt.id),
                    if down { "down" } else { "up" }.to_string(),
                ));
            }
        }
        let live: std::collections::HashSet<&str> =
            runtimes.iter().map(|r| r.id.as_str()).collect();
        published.retain(|id, _| live.contains(id.as_str()));
        if !changes.is_empty() {
            gossip.set_many(changes).await;
        }

        let peer_views = gossip.peer_values(KEY_PREFIX);
        for rt in &runtimes {
            let key = format!("{KEY_PREFIX}{}", rt.id);
            let down: Vec<u64> = peer_views
                .iter()
                .filter(|(_, kv)| kv.get(&key).map(String::as_str) == Some("down"))
                .map(|(id, _)| *id)
                .collect();
            rt.health.set_peers_down(down);
        }
    }
}
