"""Reference models of the experiments: BERT encoder (MiniLM), small ResNet, character LSTM, low-rank linear."""
