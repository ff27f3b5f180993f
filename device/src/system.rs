//! Host measurements for telemetry: CPU, memory and temperature from sysinfo.

use fleet_wire::SystemStats;
use sysinfo::{Components, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// Reads host measurements; CPU use is averaged since the previous call.
#[derive(Debug)]
pub struct SystemSampler {
    system: System,
    components: Components,
    pid: Option<Pid>,
}

impl SystemSampler {
    /// Creates a sampler and takes the first CPU reading that the next call compares to.
    pub fn new() -> SystemSampler {
        let mut system = System::new();
        system.refresh_cpu_usage();
        SystemSampler {
            system,
            components: Components::new_with_refreshed_list(),
            pid: sysinfo::get_current_pid().ok(),
        }
    }

    /// Takes a reading.
    pub fn sample(&mut self) -> SystemStats {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let process_memory_bytes = match self.pid {
            Some(pid) => {
                self.system.refresh_processes_specifics(
                    ProcessesToUpdate::Some(&[pid]),
                    false,
                    ProcessRefreshKind::nothing().with_memory(),
                );
                self.system
                    .process(pid)
                    .map_or(0, |process| process.memory())
            }
            None => 0,
        };
        self.components.refresh(false);
        let temperature_celsius = self
            .components
            .iter()
            .filter_map(|component| component.temperature())
            .filter(|celsius| celsius.is_finite())
            .reduce(f32::max);
        SystemStats {
            cpu_percent: self.system.global_cpu_usage(),
            process_memory_bytes,
            memory_used_bytes: self.system.used_memory(),
            memory_total_bytes: self.system.total_memory(),
            temperature_celsius,
        }
    }
}

impl Default for SystemSampler {
    fn default() -> Self {
        SystemSampler::new()
    }
}
