"""Export a trained model: the adapter in PEFT format and the merged model in Hugging Face format."""
