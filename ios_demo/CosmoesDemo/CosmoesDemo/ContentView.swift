// ContentView.swift: the demo's one screen, as on Android: bundle, policy and budget pickers, the prompt, the
// streamed output, live decode speed, time to first token and memory, the library's expert traffic and resident
// experts per layer, and errors as a message.
import CosmoesKit
import SwiftUI

struct ContentView: View {
    @Bindable var model: DemoModel

    var body: some View {
        NavigationStack {
            Form {
                setup
                promptSection
                outputSection
                figures
            }
            .navigationTitle("CoSMoEs")
            .onAppear { model.refreshBundles() }
            .refreshable { model.refreshBundles() }
            .onChange(of: model.bundle) { model.bundleChanged() }
        }
    }

    private var setup: some View {
        Section {
            if model.bundles.isEmpty {
                Text("No bundle in Documents/bundles. Copy one with Finder (Files tab) or `xcrun devicectl device "
                     + "copy to` (ios_demo/README.md), then pull to refresh.")
                    .foregroundStyle(.secondary)
            }
            Picker("Bundle", selection: $model.bundle) {
                ForEach(model.bundles) { Text($0.name).tag(Optional($0)) }
            }
            Picker("Policy", selection: $model.policy) {
                ForEach(model.bundle?.policies ?? ["swap"], id: \.self) { Text($0).tag($0) }
            }
            .disabled(model.budget != .none)
            Picker("Budget", selection: $model.budget) {
                ForEach(DemoModel.Budget.choices, id: \.self) { Text($0.label).tag($0) }
            }
            if model.budget == .auto {
                Text(model.budgetMB().map { "auto: \(Int($0)) MB of weights (\(Int(DemoModel.autoBudgetShare * 100)) % "
                                            + "of the memory iOS still grants the app)" }
                     ?? "auto needs os_proc_available_memory (an iPhone)")
                    .font(.footnote).foregroundStyle(.secondary)
            }
            Stepper("New tokens: \(model.maxNewTokens)", value: $model.maxNewTokens, in: 1...512, step: 16)
        }
    }

    private var promptSection: some View {
        Section("Prompt") {
            TextField("Prompt", text: $model.prompt, axis: .vertical).lineLimit(2...6)
            if model.running {
                Button("Stop", role: .destructive) { model.stop() }
            } else {
                Button("Generate") { model.start() }.disabled(model.bundle == nil)
            }
        }
    }

    private var outputSection: some View {
        Section("Output") {
            if let error = model.error {
                Text(error).foregroundStyle(.red).font(.callout.monospaced())
            }
            Text(model.output.isEmpty ? " " : model.output).textSelection(.enabled)
        }
    }

    private var figures: some View {
        Section(model.openedLabel.isEmpty ? "Figures" : "Figures: \(model.openedLabel)") {
            row("decode tok/s", model.running ? model.liveTokS.map { "≈ " + fixed($0, 1) } : model.stats.map { fixed($0.decodeTokS, 1) })
            row("TTFT ms", model.running ? model.liveTtftMs.map { "≈ " + fixed($0, 0) } : model.stats.map { fixed($0.ttftMs, 1) })
            row("prefill tok/s", model.stats.map { fixed($0.prefillTokS, 0) })
            row("memory MB (phys_footprint)", model.footprintMB.map { fixed($0, 1) })
            row("peak MB (library)", model.stats.map { fixed($0.peakRssMb, 1) })
            row("expert loads / evictions", model.stats.map { "\($0.expertLoads) / \($0.expertEvictions)" })
            row("resident per layer", model.stats.map { $0.residentPerLayer.map(String.init).joined(separator: " ") })
            row("tokens", model.stats.map { String($0.tokens.count) })
        }
    }

    private func row(_ label: String, _ value: String?) -> some View {
        LabeledContent(label, value: value ?? "–").font(.callout.monospacedDigit())
    }

    private func fixed(_ value: Double, _ digits: Int) -> String {
        value.formatted(.number.precision(.fractionLength(digits)))
    }
}
